"""Rank and port helpers shared by the trainer, the tools and the tests."""
from __future__ import annotations

import socket

import torch


def is_rank0() -> bool:
    """True on global rank 0, and in a process that has not started torch.distributed."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
