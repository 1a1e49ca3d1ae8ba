"""Where a step's time goes: exclusive wall-clock seconds per phase, each phase also a profiler
range (torch.profiler.record_function, and an NVTX range on CUDA so nsys shows the same names).

Phases nest (grad_reduce runs inside forward_backward): a phase's total excludes the phases
inside it, so the phases of a step add up to at most the step's time. On GPU the host-side clock
is what is measured; the step's own synchronizations (the loss all-reduce, the grad norm) put the
device work in the phase that waits for it.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch

from megafox import watchdog

PREFIX = "megafox/"


class PhaseTimers:
    def __init__(self):
        self.totals: Dict[str, float] = defaultdict(float)
        self._children: List[float] = []  # per open phase: seconds spent in the phases inside it
        self._nvtx = torch.cuda.is_available()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self._nvtx:
            torch.cuda.nvtx.range_push(PREFIX + name)
        self._children.append(0.0)
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(PREFIX + name):
                yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self._children.pop()
            self.totals[name] += elapsed - inner
            if self._children:
                self._children[-1] += elapsed
            if self._nvtx:
                torch.cuda.nvtx.range_pop()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def take(self) -> Dict[str, float]:
        """The totals since the last take, and start again from zero."""
        out = dict(self.totals)
        self.totals.clear()
        return out


@contextlib.contextmanager
def phase(owner, name: str, watch: Optional[str] = None):
    """The trainer is in phase `name`: timed in `owner.timers` (if it has any: a test's stand-in
    trainer may not) and, with `watch`, held to the watchdog's limit for that phase
    (megafox.watchdog.PHASES: "save", "eval")."""
    timers = getattr(owner, "timers", None)
    with timers.phase(name) if timers is not None else contextlib.nullcontext():
        with watchdog.phase(watch) if watch is not None else contextlib.nullcontext():
            yield
