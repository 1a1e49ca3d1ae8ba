"""Rank and port helpers shared by the trainer, the tools and the tests.

Free of a torch import: a process that has not imported torch has not started torch.distributed,
so the CLIs that never need torch (`megafox info`, `megafox report`, data_prep) start without it.
"""
from __future__ import annotations

import os
import socket
import sys


def is_rank0() -> bool:
    """True on global rank 0, and in a process that has not started torch.distributed."""
    torch = sys.modules.get("torch")
    return torch is None or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def rank() -> int:
    """This process's global rank: torch.distributed's once started, before that the launcher's
    (RANK from torchrun, SLURM_PROCID from srun), else 0. For messages a command prints once even
    when it fails before torch.distributed starts (a bad config on every rank)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def world_size() -> int:
    """The number of ranks torch.distributed runs; 1 before it starts."""
    torch = sys.modules.get("torch")
    return torch.distributed.get_world_size() if torch is not None and torch.distributed.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; nothing to wait for before torch.distributed starts."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_initialized():
        torch.distributed.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
