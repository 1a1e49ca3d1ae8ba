"""`debug.log_samples`: every step's stage sample ids, per data-parallel rank, in
<checkpoint.dir>/samples/<stage>.dp<rank>.jsonl — what tests (and a suspicious operator) read to
prove that no sample is repeated or skipped across restarts, layouts and stages."""
from __future__ import annotations

import json

from megafox.training.callbacks.base import Callback


class SampleLogCallback(Callback):
    def pre_step(self, trainer, batches) -> None:
        if not trainer.is_sample_logger:
            return
        path = trainer.root / "samples" / f"{trainer.stage.name}.dp{trainer.dp_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = [int(i) for b in batches for i in b["sample_index"].view(-1).tolist()]
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": trainer.state.iteration + 1, "stage": trainer.stage.name,
                                "first_sample": trainer.stage_samples, "samples": ids}) + "\n")
