"""Process-level facts every floor shares: the stop signals, the exit statuses, and no rank
outliving its launcher.

Exit statuses of `megafox-train` (docs/failures.md; launch/ scripts act on them):
    0   the stage finished (or was already finished)
    1   any other failure
    2   bad configuration or usage (the message names the file and field)
    3   halted on a non-finite loss or gradient (nan_policy: halt)
    4   no usable checkpoint: every checkpoint to resume from is incomplete or corrupt (each named);
        requeueing cannot help, so the SLURM scripts stop
    5   the checkpoint directory is in use by another live run (its lock is held)
    6   the watchdog stopped the job: a rank made no progress within its phase's limit (hung) or a
        peer stopped sending heartbeats (dead, stopped, its node lost); every rank dumped its
        Python stacks first (megafox/watchdog.py). Retryable: the SLURM scripts requeue.
    7   the rendezvous never completed (not every rank joined within
        parallel.rendezvous_timeout_seconds). Retryable: the SLURM scripts requeue.
    75  stopped early after saving a checkpoint (SIGUSR1/SIGTERM or --exit-after-minutes):
        resubmit / requeue to continue. 75 is EX_TEMPFAIL from sysexits.h.
    130 interrupted by Ctrl-C (SIGINT) before a save could be made

Imports nothing heavy: `megafox.train` calls `hold_stop_signals()` before importing torch, so a
SIGUSR1 that arrives while a rank is still starting up (SLURM's time-limit warning, an operator)
waits instead of killing the process.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NAN = 3
EXIT_NO_CHECKPOINT = 4
EXIT_LOCKED = 5
EXIT_HUNG = 6
EXIT_RENDEZVOUS = 7
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def hold_stop_signals() -> None:
    """Block the stop signals: one that arrives now stays pending (it is not lost and does not
    kill the process) until `release_stop_signals`, called once the trainer's handler is in place.
    The mask is inherited by helper processes started meanwhile (e.g. the checkpoint writer), which
    must never die of these signals."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """Unblock the stop signals; a pending one is delivered to the (new) handler right away."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# A rank must not outlive the process that launched it. torchrun starts every rank in a session of
# its own, so when the launcher is killed (kill -9 of launch/local.sh's process group, an OOM kill,
# a dead login shell) nothing signals the ranks: they would keep training and saving into the
# checkpoint directory unattended, and a restart would then have two writers. Works the same under
# torchrun and srun.
_watching = False


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """A daemon thread notices the parent is gone (this rank is re-parented) and kills this
    process, as the launcher's death would have."""
    global _watching
    parent = os.getppid()
    if _watching or parent <= 1:
        return  # already watching, or already orphaned / started by init: nothing to watch
    _watching = True

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                print(f"[rank {os.environ.get('RANK', '?')}] launcher (pid {parent}) is gone: stopping this rank",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="megafox-parent-watch", daemon=True).start()
