"""Process-group set-up: torch.distributed from torchrun or SLURM, then megatron-core's
parallel_state for the TP x PP x DP layout.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under `srun` without torchrun
we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID instead, so both launch styles work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from megafox.config import ParallelConfig


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


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> DistEnv:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and megatron-core's parallel groups."""
    from megatron.core import parallel_state, tensor_parallel

    from megafox.cpu_backend import install_if_no_cuda

    env = dist_env_from_environ()
    on_cpu = install_if_no_cuda()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", env.master_port)
        if not on_cpu:
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=env.rank, world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes))
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
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
