"""The trainer's save mechanism (OLMo-core's Trainer.save_checkpoint): what a save of this run
holds and how it is committed. When to save is the CheckpointCallback's
(megafox.training.callbacks.checkpointing); the on-disk work is megafox.checkpoint's.

Each save records the run (megafox.records.CheckpointRecord: run state, scheduler position,
layout, tokenizer and the effective config after overrides). With `checkpoint.async_save` a save
only stages the state in host memory before the next step starts; the shards are written in the
background and the save is committed (digests, megafox.json, `latest`, rotation, then
`pre_checkpoint_commit` / `post_checkpoint`) by the first `poll` after every rank has finished
writing. A stop, the end of a stage and the next save wait for it first, so the process never
exits with a save in flight; a crash or kill before the commit leaves `latest` on the previous
checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Optional

from megafox.checkpoint.saver import CheckpointSaver, SaveReport
from megafox.checkpoint.state import layout_signature, saves_by_range, training_state
from megafox.records import CheckpointRecord, config_mapping
from megafox.parallel.parallelize import params_gathered
from megafox import watchdog


class TrainerCheckpoints:
    """Saves of one trainer's run, at most one in flight. Every method is collective."""

    def __init__(self):
        self.last_saved: Optional[int] = None  # the newest iteration saved or being saved
        self.saver: Optional[CheckpointSaver] = None

    def start(self, trainer) -> None:
        """After set-up and resume, before the first step."""
        # a resumed stage starts from a checkpoint of this very iteration
        self.last_saved = trainer.state.iteration if trainer.stage_samples else None
        self.saver = CheckpointSaver(async_save=trainer.config.checkpoint.async_save)

    def poll(self, trainer) -> Optional[Path]:
        """Commit the save in flight if every rank has written it; never waits."""
        return self._committed(trainer, self.saver.poll())

    def save_unless_saved(self, trainer) -> None:
        """Before stopping: this iteration's checkpoint, complete on disk."""
        if self.last_saved != trainer.state.iteration:
            self.save(trainer, stage_end=False)
        else:
            self.finish_pending(trainer)

    def finish_pending(self, trainer) -> None:
        if self.saver is not None:
            with watchdog.phase("save"):
                self._committed(trainer, self.saver.wait())

    def save(self, trainer, stage_end: bool, wait: bool = True) -> Optional[Path]:
        """Save this iteration; with `wait` (or a synchronous saver) return once it is committed."""
        with watchdog.phase("save"):  # held to watchdog.save_seconds, not to the step limit
            return self._save(trainer, stage_end, wait)

    def _save(self, trainer, stage_end: bool, wait: bool) -> Optional[Path]:
        self.finish_pending(trainer)
        cfg = trainer.config
        record = CheckpointRecord(
            iteration=trainer.state.iteration, kind="train", model=cfg.model, layout=layout_signature(),
            tokenizer=trainer.tokenizer_record,  # what megafox-to-hf ships with the weights (+ chat template)
            stage=trainer.stage.name, stage_index=trainer.stage_index, stage_end=stage_end,
            seq_length=trainer.stage.seq_length, global_batch_size=trainer.gbs,
            scheduler=trainer.scheduler.state_dict(), run_state=dataclasses.replace(trainer.state),
            config=config_mapping(cfg))
        # overlap_param_gather leaves other ranks' shards stale; a `sharded` save writes only the
        # ranges this rank owns (always current), a `gathered` one needs them all
        gather = contextlib.nullcontext() if saves_by_range(trainer.optimizer, cfg.checkpoint.format) \
            else params_gathered(trainer.model)
        t0 = time.monotonic()
        with gather:
            state, strategy = training_state(trainer.model, trainer.optimizer, cfg.checkpoint.format)
        report = self.saver.save(trainer.root, trainer.state.iteration, state, record,
                                 keep_last=cfg.checkpoint.keep_last, sharded_strategy=strategy,
                                 before_commit=lambda p: trainer.call("pre_checkpoint_commit", p))
        self.last_saved = trainer.state.iteration
        if report is None:
            staged = self.saver.pending.staged
            trainer.log(f"saving checkpoint iteration {trainer.state.iteration} in the background "
                        f"(training stood still {time.monotonic() - t0:.2f}s for it, {staged:.2f}s of it the "
                        "copy to host memory)")
            if wait:
                report = self.saver.wait()
        trainer.metrics.reset_window()
        return self._committed(trainer, report)

    def _committed(self, trainer, report: Optional[SaveReport]) -> Optional[Path]:
        if report is None:
            return None
        how = f"{report.total_s:.1f}s" if report.total_s - report.stall_s < 0.05 else \
            f"{report.total_s:.1f}s, of which training stood still {report.stall_s:.2f}s"
        trainer.log(f"saved checkpoint {report.path} (iteration {report.iteration}, {how})")
        trainer.call("post_checkpoint", report.path)
        return report.path

    def abandon(self, trainer) -> None:
        """The run is failing: the other ranks may never reach the collective a commit needs, so
        a save in flight is left uncommitted."""
        abandoned = self.saver.abandon() if self.saver is not None else None
        if abandoned is not None:
            trainer.log(f"checkpoint iteration {abandoned} was still being written and is left incomplete "
                        "(`latest` stays on the previous one)")
