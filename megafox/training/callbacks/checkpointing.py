"""When a training run saves: every `checkpoint.interval` steps (the trainer also saves when a
stop is agreed and at the end of a stage). How a save is made and committed is the trainer's
(megafox.training.checkpoints.TrainerCheckpoints, OLMo-core's split of Trainer.save_checkpoint
and its checkpointer callback).
"""
from __future__ import annotations

from megafox.training.callbacks.base import Callback
from megafox.training.timers import phase


class CheckpointCallback(Callback):
    def post_step(self, trainer, report) -> None:
        with phase(trainer, "checkpoint"):  # the time training stands still for saves
            trainer.checkpoints.poll(trainer)  # an asynchronous save whose writes are done: commit it
            if not trainer.stage_finished and report.iteration % trainer.config.checkpoint.interval == 0:
                trainer.checkpoints.save(trainer, stage_end=False, wait=False)
