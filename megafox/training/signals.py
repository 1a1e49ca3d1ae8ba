"""Exit statuses of `megafox-train` and the preemption hook.

Exit statuses (documented in README; launch/ scripts act on them):
    0   the stage finished (or was already finished)
    1   any other failure
    2   bad configuration or usage (the message names the file and field)
    3   halted on a non-finite loss or gradient (nan_policy: halt)
    75  stopped early after saving a checkpoint (SIGUSR1/SIGTERM or --exit-after-minutes):
        resubmit / requeue to continue. 75 is EX_TEMPFAIL from sysexits.h.

A signal only sets a flag; the loop finishes the current step, then every rank all-reduces the
flag (so all ranks agree even when the scheduler signalled only some of them), saves and exits.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NAN = 3
EXIT_REQUEUE = 75

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Collects local reasons to stop (a signal, the time limit) and agrees on them globally."""

    def __init__(self, exit_after_minutes: Optional[float] = None):
        self.signal_name: Optional[str] = None
        self.deadline = time.monotonic() + 60.0 * exit_after_minutes if exit_after_minutes else None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local_reason(self) -> int:
        """0 = keep going, 1 = time limit, 2 = signal (the larger wins in the all-reduce)."""
        if self.signal_name is not None:
            return 2
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return 1
        return 0

    def agreed(self) -> int:
        """The largest reason over all ranks; every rank gets the same answer (a collective)."""
        import torch  # not at import time: megafox.train stays light for checkpoint writer spawns

        flag = torch.tensor([self.local_reason()], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def describe(reason: int, signal_name: Optional[str]) -> str:
        if reason == 2:
            return f"signal {signal_name or 'received on another rank'}"
        return "--exit-after-minutes reached"
