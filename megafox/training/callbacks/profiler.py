"""On-demand profiling (`profile:` in the config): a torch.profiler trace of chosen steps on chosen
ranks, and on CUDA the allocator's memory snapshot when a step runs out of memory.

The trace is Chrome-trace JSON named `*.pt.trace.json`, which chrome://tracing, Perfetto and
TensorBoard's profiler plugin all open: <profile.dir>/rank<R>.steps<first>-<last>.pt.trace.json.
Each traced step is one `ProfilerStep#<iteration>` range (the global iteration of the log line)
that covers the whole step: data, forward/backward, gradient reduction, optimizer and every other
callback's work on it; the phases inside are the `megafox/<phase>` ranges of
megafox.training.timers, which on CUDA are NVTX ranges too (`nsys profile` shows them without
this callback).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional

import torch

from megafox.config import TrainConfig
from megafox.training.callbacks.base import Callback


def _always_record(step: int) -> torch.profiler.ProfilerAction:
    return torch.profiler.ProfilerAction.RECORD


class ProfilerCallback(Callback):
    @classmethod
    def for_rank(cls, config: TrainConfig, rank: int) -> List["ProfilerCallback"]:
        p = config.profile
        traced = bool(p.steps) and rank in p.ranks
        oom = torch.cuda.is_available() and p.memory_snapshot_on_oom
        return [cls(config, rank, traced)] if traced or oom else []

    def __init__(self, config: TrainConfig, rank: int, traced: bool):
        self.settings, self.rank, self.traced = config.profile, rank, traced
        self.dir = Path(self.settings.dir or Path(config.checkpoint.dir) / "profile")
        self.first, self.last = self.settings.steps if traced else (0, -1)
        self.profiler: Optional[torch.profiler.profile] = None
        self.path: Optional[Path] = None

    def on_start(self, trainer) -> None:
        if torch.cuda.is_available() and self.settings.record_memory_history:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        self._maybe_start(trainer.state.iteration + 1)

    def post_step(self, trainer, report) -> None:
        if self.profiler is None:
            self._maybe_start(report.iteration + 1)
        elif report.iteration >= self.last:
            self._stop(trainer)
        else:
            self.profiler.step()  # closes ProfilerStep#<iteration>, opens the next one

    def _maybe_start(self, next_iteration: int) -> None:
        if not self.traced or self.path is not None or not self.first <= next_iteration <= self.last:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # a schedule (always record) is what makes the profiler mark ProfilerStep#N ranges
        self.profiler = torch.profiler.profile(activities=activities, schedule=_always_record,
                                               record_shapes=self.settings.record_shapes,
                                               with_stack=self.settings.with_stack)
        self.profiler.step_num = next_iteration  # ProfilerStep#N numbers the run's own iterations
        self.profiler.start()
        self.started = next_iteration
        self.path = self.dir / f"rank{self.rank}.steps{next_iteration}-{self.last}.pt.trace.json"

    def _stop(self, trainer) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.path))
        print(f"[rank {self.rank}] profiler trace of steps {self.started}-{self.last}: {self.path}", flush=True)

    def on_error(self, trainer, exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError) and self.settings.memory_snapshot_on_oom:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"rank{self.rank}.oom.iter{trainer.state.iteration}.pickle"
            with open(path, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            print(f"[rank {self.rank}] out of memory: allocator snapshot in {path} "
                  "(drag it into https://pytorch.org/memory_viz)", flush=True)

    def close(self, trainer) -> None:
        if self.profiler is not None:  # the run stopped inside the traced steps: keep what was traced
            self.last = trainer.state.iteration
            self.path = self.dir / f"rank{self.rank}.steps{self.started}-{self.last}.pt.trace.json"
            self._stop(trainer)
