"""A rank must not outlive the process that launched it.

torchrun starts every rank in a session of its own, so when the launcher is killed (kill -9 of
launch/local.sh's process group, an OOM kill, a dead login shell) nothing signals the ranks: they
would keep training and saving into the checkpoint directory unattended, and a restart would
then have two writers. A daemon thread notices the parent is gone (the rank is re-parented) and
kills this process, as the launcher's death would have. Works the same under torchrun and srun.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


_watching = False


def exit_with_parent(poll_seconds: float = 1.0) -> None:
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
