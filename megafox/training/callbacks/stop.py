"""Stop requests: SIGUSR1/SIGTERM (SLURM's time-limit warning, preemption, scancel) and
--exit-after-minutes. A signal only sets a flag; after each step every rank all-reduces the
flag (so all ranks agree even when the scheduler signalled only some of them), then the trainer
saves and exits 75 (megafox.runtime.process).

The stop signals are held (blocked) from process start (megafox.train) until `install` puts the
handler in place; a signal that came meanwhile is delivered to it then, so a rank that is still
importing torch when the warning comes stops cleanly instead of dying of it.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch

from megafox.runtime.process import STOP_SIGNALS, release_stop_signals
from megafox.training.callbacks.base import Callback

_TIME_LIMIT, _SIGNAL = 1, 2  # the larger wins in the all-reduce


class StopCallback(Callback):
    """Collects local reasons to stop (a signal, the time limit) and agrees on them globally."""

    def __init__(self, exit_after_minutes: Optional[float] = None):
        self.signal_name: Optional[str] = None
        self.deadline = time.monotonic() + 60.0 * exit_after_minutes if exit_after_minutes else None
        self._previous = {}

    def install(self) -> "StopCallback":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        release_stop_signals()  # a signal held since start-up arrives now, at the handler
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def close(self, trainer) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local_reason(self, signals_only: bool = False) -> int:
        if self.signal_name is not None:
            return _SIGNAL
        if not signals_only and self.deadline is not None and time.monotonic() >= self.deadline:
            return _TIME_LIMIT
        return 0

    def agreed(self, signals_only: bool = False) -> int:
        """The largest reason over all ranks (0: keep going); every rank gets the same answer.
        `signals_only`: before the first step, where the time limit does not apply yet."""
        flag = torch.tensor([self.local_reason(signals_only)], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def describe(self, reason: int) -> str:
        if reason == _SIGNAL:
            return f"signal {self.signal_name or 'received on another rank'}"
        return "--exit-after-minutes reached"
