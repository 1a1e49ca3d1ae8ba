"""Fault injection for tests, from the tests' side: `megafox-train` with extra callbacks.

    python -m tests.support.faults [--kill-at-step K] [--crash-in-save N] [--nan-at-step K]
                                     [--step-sleep S] [--slow-rank R --slow-seconds S]
                                     [--signal-at-step K] [--stop-at-step K@R] [--hang-at-step K@R]
                                     [--once DIR] -- <megafox-train arguments>

K@R: at step K on global rank R only (`--kill-at-step K@R` too; plain K: every rank). --once DIR
makes each of those faults fire in one run only (the first to create DIR/<fault>), so a requeued
or restarted job trains on undisturbed.

The launchers run it in place of the trainer through MEGAFOX_TRAIN_CMD (e.g.
`MEGAFOX_TRAIN_CMD="python -m tests.support.faults --kill-at-step 7 --" launch/local.sh stage1`),
so production code reads no test-only variables: a real run can never be killed or slowed by one
left in a user's environment.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from megafox.runtime.process import hold_stop_signals

hold_stop_signals()  # as megafox.train does, before the slow imports

import torch  # noqa: E402

from megafox.checkpoint.state import unwrap  # noqa: E402
from megafox.runtime.dist import rank as global_rank  # noqa: E402
from megafox.train import main as train_main  # noqa: E402
from megafox.training.callbacks.base import Callback  # noqa: E402


class KillAtStep(Callback):
    """SIGKILL this process at the start of step `step`, as a node failure: no handler, no cleanup."""

    def __init__(self, step: int):
        self.step = step

    def pre_step(self, trainer, batches) -> None:
        if trainer.state.iteration + 1 == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _claim(once) -> bool:
    """True for the first process ever to claim `once` (None: always)."""
    if once is None:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class RankFault(Callback):
    """At the start of step `step` on rank `rank` (any rank if None): `kill` (SIGKILL: a segfault,
    an OOM kill), `stop` (SIGSTOP: a hung GPU or driver call, to its peers) or `hang` (the main
    thread blocks forever, the process otherwise alive: a deadlocked data worker or collective)."""

    def __init__(self, what: str, step: int, rank=None, once=None):
        self.what, self.step, self.rank, self.once = what, step, rank, once

    def pre_step(self, trainer, batches) -> None:
        if trainer.state.iteration + 1 != self.step or (self.rank is not None and global_rank() != self.rank):
            return
        if not _claim(self.once):
            return
        # the wall-clock time, comparable with the launchers' log lines: how fast the job ends
        print(f"[test fault] rank {global_rank()}: {self.what} at step {self.step} ({time.strftime('%F %T')})",
              flush=True)
        if self.what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.what == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            threading.Event().wait()


class CrashInSave(Callback):
    """Die in this process's `nth` save, after its shards are written and before megafox.json."""

    def __init__(self, nth: int):
        self.nth, self.saves = nth, 0

    def pre_checkpoint_commit(self, trainer, path) -> None:
        self.saves += 1
        if self.saves == self.nth:
            print(f"[test fault] crashing in save #{self.saves} before metadata", flush=True)
            os._exit(1)


class NanAtStep(Callback):
    """Make step `step`'s loss NaN (from the last pipeline stage's per-token losses, so the
    gradients are NaN too)."""

    def __init__(self, step: int):
        self.step, self.handles = step, []

    def pre_step(self, trainer, batches) -> None:
        if trainer.state.iteration + 1 != self.step:
            return
        for chunk in trainer.model:
            model = unwrap(chunk)
            if model.post_process:
                self.handles.append(model.register_forward_hook(lambda mod, args, out: out * float("nan")))

    def post_step(self, trainer, report) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class SlowRank(Callback):
    """Make one global rank's forward `seconds` slower per micro-batch, as a throttled GPU would be."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds

    def on_start(self, trainer) -> None:
        if torch.distributed.get_rank() != self.rank:
            return
        for chunk in trainer.model:
            chunk.register_forward_pre_hook(lambda module, args: time.sleep(self.seconds))


class SignalAtStep(Callback):
    """SIGUSR1 to global rank 0 itself after step `step`, as SLURM's requeue warning: the run saves and
    exits EXIT_REQUEUE through the real signal path."""

    def __init__(self, step: int):
        self.step = step

    def post_step(self, trainer, report) -> None:
        if report.iteration == self.step and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


class StepSleep(Callback):
    """Sleep before every step: a slow step, so a signal reliably arrives mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def pre_step(self, trainer, batches) -> None:
        time.sleep(self.seconds)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.support.faults")
    parser.add_argument("--kill-at-step")
    parser.add_argument("--crash-in-save", type=int)
    parser.add_argument("--nan-at-step", type=int)
    parser.add_argument("--step-sleep", type=float)
    parser.add_argument("--signal-at-step", type=int)
    parser.add_argument("--slow-rank", type=int, help="with --slow-seconds: the global rank to slow down")
    parser.add_argument("--slow-seconds", type=float, default=0.2)
    parser.add_argument("--stop-at-step")
    parser.add_argument("--hang-at-step")
    parser.add_argument("--once")
    faults = parser.parse_args(argv[:split])
    callbacks = []
    for what in ("kill", "stop", "hang"):
        spec = getattr(faults, f"{what}_at_step")
        if not spec:
            continue
        step, _, rank = spec.partition("@")
        if what == "kill" and not rank and not faults.once:
            callbacks.append(KillAtStep(int(step)))
        else:
            once = os.path.join(faults.once, what) if faults.once else None
            callbacks.append(RankFault(what, int(step), int(rank) if rank else None, once))
    if faults.crash_in_save:
        callbacks.append(CrashInSave(faults.crash_in_save))
    if faults.nan_at_step:
        callbacks.append(NanAtStep(faults.nan_at_step))
    if faults.signal_at_step:
        callbacks.append(SignalAtStep(faults.signal_at_step))
    if faults.slow_rank is not None:
        callbacks.append(SlowRank(faults.slow_rank, faults.slow_seconds))
    if faults.step_sleep:
        callbacks.append(StepSleep(faults.step_sleep))
    return train_main(argv[split + 1:], callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
