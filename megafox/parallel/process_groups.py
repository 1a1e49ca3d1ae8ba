"""Process-group set-up: torch.distributed from torchrun or SLURM, then megatron-core's
parallel_state for the TP x PP x DP layout.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under `srun` without torchrun
we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID instead, so both launch styles work.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Optional
from datetime import timedelta

import torch
from megatron.core import parallel_state, tensor_parallel
from torch.distributed import TCPStore

from megafox.config import ParallelConfig
from megafox.parallel.cpu_backend import install_if_no_cuda


class RendezvousFailed(RuntimeError):
    """Not every rank joined within parallel.rendezvous_timeout_seconds (exit EXIT_RENDEZVOUS)."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str


def dist_env_from_environ(environ=os.environ) -> DistEnv:
    """Rank and rendezvous from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world, local = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    return DistEnv(rank, world, local, environ.get("MASTER_ADDR", "127.0.0.1"), environ.get("MASTER_PORT", "29500"))


def rendezvous_store(env: DistEnv, timeout_s: float, pg_timeout: timedelta):
    """The c10d TCPStore every rank meets at, as init_process_group's env:// would make it (rank 0
    hosts it, or torchrun's agent does), but with its own time limit: a rank or host that never
    comes is a one-line error after `timeout_s`, not a hang for the whole process-group timeout."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    where = (f"rank {env.rank} of {env.world_size} on host {socket.gethostname()}: rendezvous at "
             f"{env.master_addr}:{env.master_port}")
    try:
        store = TCPStore(env.master_addr, int(env.master_port), env.world_size, is_master=env.rank == 0 and not agent,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=True, multi_tenant=not agent)
        # a barrier: every rank (not only rank 0, which hosts the store) learns that all have come
        store.add("megafox/rendezvous", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("megafox/rendezvous", 0) < env.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{store.add('megafox/rendezvous', 0)} of {env.world_size} ranks arrived")
            time.sleep(0.05)
    except Exception as exc:  # DistNetworkError / DistStoreError / RuntimeError: all the same to a user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousFailed(f"{where} did not complete within {timeout_s:.0f}s "
                               f"(parallel.rendezvous_timeout_seconds): {first[:200]}") from None
    store.set_timeout(pg_timeout)
    return store


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: Optional[float] = None) -> DistEnv:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and megatron-core's parallel groups."""
    env = dist_env_from_environ()
    on_cpu = install_if_no_cuda()
    timeout_minutes = parallel.distributed_timeout_minutes if timeout_minutes is None else timeout_minutes
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", env.master_port)
        if not on_cpu:
            torch.cuda.set_device(env.local_rank)
        pg_timeout = timedelta(minutes=timeout_minutes)
        store = rendezvous_store(env, parallel.rendezvous_timeout_seconds, pg_timeout) if env.world_size > 1 else None
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=env.rank, world_size=env.world_size,
            timeout=pg_timeout, **({"store": store} if store is not None else {}))
    parallel.validate(world_size=env.world_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=True,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
