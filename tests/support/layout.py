"""Helpers for multi-rank tests: the current layout, mapped weights, gathered weights."""
from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core import parallel_state as ps

from megafox.config import ModelConfig, ParallelConfig
from megafox.model.hf_mapping import Layout, RankKey, hf_to_megatron, load_rank_state, megatron_to_hf, rank_state


def current_parallel(use_distributed_optimizer: bool = True) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        use_distributed_optimizer=use_distributed_optimizer)


def layout_of(parallel: ParallelConfig) -> Layout:
    return Layout(parallel.tp, parallel.pp, parallel.vpp)


def my_key(vp_stage: int = 0) -> RankKey:
    return RankKey(ps.get_pipeline_model_parallel_rank(), vp_stage, ps.get_tensor_model_parallel_rank())


def load_hf_weights(chunks: List[torch.nn.Module], hf: Dict[str, torch.Tensor], model: ModelConfig,
                    parallel: ParallelConfig) -> None:
    mapped = hf_to_megatron(hf, model, layout_of(parallel))
    for vp, chunk in enumerate(chunks):
        load_rank_state(_unwrap(chunk), mapped[my_key(vp)])


def gather_hf_weights(chunks: List[torch.nn.Module], model: ModelConfig, parallel: ParallelConfig):
    """All ranks' weights as one HF state dict on rank 0 (None elsewhere)."""
    mine = {}
    if ps.get_data_parallel_rank() == 0:
        mine = {my_key(vp): rank_state(_unwrap(chunk)) for vp, chunk in enumerate(chunks)}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if torch.distributed.get_rank() != 0:
        return None
    ranks = {k: v for part in gathered for k, v in part.items()}
    return megatron_to_hf(ranks, model, layout_of(parallel))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module
