"""Held-out loss every `validation.interval` steps and at the end of a stage.

The forward runs through the same pipeline schedule as training (forward_only, under no_grad) on
the stage's held-out documents, in the run's own layout; the mean per-token loss over
`validation.batches` global batches goes to the metrics.
"""
from __future__ import annotations

import torch

from megafox.training.callbacks.base import Callback
from megafox.training.step import train_step
from megafox.training.timers import phase


class ValidationCallback(Callback):
    def post_step(self, trainer, report) -> None:
        interval = trainer.config.validation.interval
        if interval and (report.iteration % interval == 0 or trainer.stage_finished):
            with phase(trainer, "validation", watch="eval"):
                self.validate(trainer)

    @staticmethod
    def validate(trainer) -> None:
        total, tokens = 0.0, 0
        for b in range(trainer.config.validation.batches):
            batches = list(trainer.data.valid_micro_batches(b * trainer.gbs, trainer.mbs, trainer.dp_rank,
                                                            trainer.dp_size))
            if not batches:
                break
            for chunk in trainer.model:
                chunk.eval()
            try:
                with torch.no_grad():
                    result = train_step(trainer.model, trainer.optimizer, trainer.iterator(batches), len(batches),
                                        *trainer.schedule_shape, forward_only=True)
            finally:
                for chunk in trainer.model:
                    chunk.train()
            total += result.loss * result.num_tokens
            tokens += result.num_tokens
        if tokens:
            trainer.metrics.validation(trainer.state.iteration, trainer.state.consumed_tokens, total / tokens)
        trainer.metrics.reset_window()
