"""On-demand profiling (`profile:` in the config): a torch.profiler trace of chosen steps on chosen
ranks, or of the next steps of a rank that receives SIGUSR2, and on CUDA the allocator's memory
snapshot when a step runs out of memory.

The trace is Chrome-trace JSON named `*.pt.trace.json`, which chrome://tracing, Perfetto and
TensorBoard's profiler plugin all open: <profile.dir>/rank<R>.steps<first>-<last>.pt.trace.json.
Each traced step is one `ProfilerStep#<iteration>` range (the global iteration of the log line)
that covers the whole step: data, forward/backward, gradient reduction, optimizer and every other
callback's work on it (this callback is the trainer's last); the phases inside are the
`megafox/<phase>` ranges of megafox.training.timers, which on CUDA are NVTX ranges too
(`nsys profile` shows them without this callback).
"""
from __future__ import annotations

import pickle
import signal
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from megafox.config import TrainConfig
from megafox.training.callbacks.base import Callback

TRACE_SIGNAL = signal.SIGUSR2  # SIGUSR1 and SIGTERM are the stop signals (megafox.runtime.process)


def _always_record(step: int) -> torch.profiler.ProfilerAction:
    return torch.profiler.ProfilerAction.RECORD


class ProfilerCallback(Callback):
    @classmethod
    def for_rank(cls, config: TrainConfig, rank: int) -> List["ProfilerCallback"]:
        p = config.profile
        wanted = (bool(p.steps) and rank in p.ranks) or p.signal_steps > 0 or \
            (torch.cuda.is_available() and p.memory_snapshot_on_oom)
        return [cls(config, rank)] if wanted else []

    def __init__(self, config: TrainConfig, rank: int):
        self.settings, self.rank = config.profile, rank
        self.dir = Path(self.settings.dir or Path(config.checkpoint.dir) / "profile")
        # the configured steps, traced once; a SIGUSR2 adds a window of the next signal_steps steps
        self.configured: Optional[Tuple[int, int]] = \
            tuple(self.settings.steps) if self.settings.steps and rank in self.settings.ranks else None
        self.window: Optional[Tuple[int, int]] = None  # the steps being traced now
        self.profiler: Optional[torch.profiler.profile] = None
        self.signalled = False
        self._previous_handler = None

    def on_start(self, trainer) -> None:
        if torch.cuda.is_available() and self.settings.record_memory_history:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        if self.settings.signal_steps > 0:
            self._previous_handler = signal.signal(TRACE_SIGNAL, self._on_signal)
        self._maybe_start(trainer.state.iteration + 1)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def post_step(self, trainer, report) -> None:
        if self.profiler is None:
            self._maybe_start(report.iteration + 1)
        elif report.iteration >= self.window[1]:
            self._stop()
            self._maybe_start(report.iteration + 1)
        else:
            self.profiler.step()  # closes ProfilerStep#<iteration>, opens the next one

    def _maybe_start(self, next_iteration: int) -> None:
        if self.configured and self.configured[0] <= next_iteration <= self.configured[1]:
            self.window, self.configured = (next_iteration, self.configured[1]), None
        elif self.signalled:
            self.window, self.signalled = (next_iteration, next_iteration + self.settings.signal_steps - 1), False
            print(f"[rank {self.rank}] {TRACE_SIGNAL.name}: tracing steps {self.window[0]}-{self.window[1]}", flush=True)
        else:
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

    def _stop(self, last: Optional[int] = None) -> None:
        profiler, self.profiler = self.profiler, None
        first, last = self.window[0], last if last is not None else self.window[1]
        profiler.stop()
        if last < first:  # stopped before the first traced step ran: nothing to keep
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}.steps{first}-{last}.pt.trace.json"
        profiler.export_chrome_trace(str(path))
        print(f"[rank {self.rank}] profiler trace of steps {first}-{last}: {path}", flush=True)

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
            self._stop(last=trainer.state.iteration)
        if self._previous_handler is not None:
            signal.signal(TRACE_SIGNAL, self._previous_handler)
            self._previous_handler = None
