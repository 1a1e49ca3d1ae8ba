"""Checkpoints of a training run: every `checkpoint.interval` steps, when a stop is agreed, and at
the end of a stage. Each save records the run (megafox.records.CheckpointRecord: run state,
scheduler position, layout, tokenizer and the effective config after overrides)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from megafox import checkpoint as ckpt
from megafox.records import CheckpointRecord, config_mapping
from megafox.training.callbacks.base import Callback


class CheckpointCallback(Callback):
    def __init__(self):
        self.last_saved: Optional[int] = None

    def on_start(self, trainer) -> None:
        # a resumed stage starts from a checkpoint of this very iteration
        self.last_saved = trainer.state.iteration if trainer.stage_samples else None

    def post_step(self, trainer, report) -> None:
        if not trainer.stage_finished and report.iteration % trainer.config.checkpoint.interval == 0:
            self.save(trainer, stage_end=False)

    def save_unless_saved(self, trainer) -> None:
        if self.last_saved != trainer.state.iteration:
            self.save(trainer, stage_end=False)

    def save(self, trainer, stage_end: bool) -> Path:
        from megafox.training.step import params_gathered

        t0 = time.monotonic()
        cfg = trainer.config
        record = CheckpointRecord(
            iteration=trainer.state.iteration, kind="train", model=cfg.model, layout=ckpt.layout_signature(),
            tokenizer=trainer.tokenizer_record,  # what megafox-to-hf ships with the weights
            stage=trainer.stage.name, stage_index=trainer.stage_index, stage_end=stage_end,
            seq_length=trainer.stage.seq_length, global_batch_size=trainer.gbs,
            scheduler=trainer.scheduler.state_dict(), run_state=dataclasses.replace(trainer.state),
            config=config_mapping(cfg))
        with params_gathered(trainer.model):  # overlap_param_gather leaves other ranks' shards stale
            path = ckpt.save_training_checkpoint(
                trainer.root, trainer.state.iteration, trainer.model, trainer.optimizer, record,
                keep_last=cfg.checkpoint.keep_last,
                before_commit=lambda p: trainer.call("pre_checkpoint_commit", p))
        trainer.log(f"saved checkpoint {path} (iteration {trainer.state.iteration}, {time.monotonic() - t0:.1f}s)")
        trainer.metrics.reset_window()
        self.last_saved = trainer.state.iteration
        trainer.call("post_checkpoint", path)
        return path
