"""The callback lifecycle of the training loop (OLMo-core's Callback is the anchor).

The loop itself only steps (and saves, when told to: megafox.training.checkpoints); everything
else a run does around the steps (metrics, validation, when to save, stop requests, in-loop
evaluation, and the tests' fault injection) is a Callback that the trainer calls at these points,
in list order:

    on_start(trainer)                      after set-up and resume, before the first step
    pre_step(trainer, batches)             before each step, with this rank's micro-batches
    post_step(trainer, result)             after the optimizer step and the run-state update
    pre_checkpoint_commit(trainer, path)   a save's shards are on disk, megafox.json not yet
    post_checkpoint(trainer, path)         a save is complete (megafox.json written, `latest` moved)
    on_stage_end(trainer)                  the stage budget is reached (final save done, .done written)
    on_error(trainer, exc)                 the run is failing with `exc` (the trainer re-raises it)
    close(trainer)                         always, last

Stop requests (SIGUSR1/SIGTERM, --exit-after-minutes) are the StopCallback's
(megafox.training.callbacks.stop): the trainer agrees on them over all ranks after each step.
"""
from __future__ import annotations

from typing import Any, Dict, List

# Hooks annotate `trainer` as "Trainer" (megafox.training.loop.Trainer) by name only: the trainer
# imports its callbacks, so importing it here would make the two modules import each other.


class Callback:
    """Every hook is optional; the defaults do nothing."""

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def pre_step(self, trainer: "Trainer", batches: List[Dict[str, Any]]) -> None:
        pass

    def post_step(self, trainer: "Trainer", result: Any) -> None:
        pass

    def pre_checkpoint_commit(self, trainer: "Trainer", path) -> None:
        pass

    def post_checkpoint(self, trainer: "Trainer", path) -> None:
        pass

    def on_stage_end(self, trainer: "Trainer") -> None:
        pass

    def on_error(self, trainer: "Trainer", exc: BaseException) -> None:
        pass

    def close(self, trainer: "Trainer") -> None:
        pass
