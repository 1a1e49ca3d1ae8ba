"""One run at a time per checkpoint directory.

Two trainers writing the same checkpoint directory (a restart while orphaned ranks of the first
run are still alive, a second job submitted on the same checkpoint.dir) would interleave their
saves and move `latest` under each other. Rank 0 holds an exclusive POSIX record lock
(fcntl.lockf) on `<checkpoint.dir>/.megafox.lock` for the life of the process: the kernel drops it
when the process dies however it dies (kill -9 included), it is not inherited by the checkpoint
writer's helper processes, and it also works over NFS (through the lock manager). The file holds
who has it, for the message the second run prints.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Optional

from megafox.checkpoint.errors import CheckpointError
from megafox.runtime.dist import is_rank0

LOCK_FILE = ".megafox.lock"


class RunLocked(CheckpointError):
    """Another live run holds the checkpoint directory (exit status 5)."""


class CheckpointDirLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise RunLocked naming who holds it. Rank 0 only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.path.parent}: in use by another run ({holder}); stop it first, or use "
                            f"another checkpoint.dir") from None
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                 "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (it is rewritten by the next holder)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return "holder unknown"
    job = f", SLURM job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('since')}"


def lock_for_run(directory: Path) -> CheckpointDirLock:
    """Collective: rank 0 takes the lock and every rank learns whether it got it (all raise together)."""
    import torch.distributed as dist

    lock, problem = CheckpointDirLock(directory), None
    if is_rank0():
        try:
            lock.acquire()
        except (RunLocked, OSError) as exc:
            problem = str(exc) if isinstance(exc, RunLocked) else f"{lock.path}: cannot lock ({exc})"
    if dist.is_initialized():
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        lock.release()
        raise RunLocked(problem)
    return lock
