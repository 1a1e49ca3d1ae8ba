"""What a training checkpoint holds: the sharded state dict of the model, the optimizer and
every rank's RNG streams, in the layout megatron-core's dist_checkpointing saves and loads.

dist_checkpointing stores global (unsharded) tensor layouts, so a checkpoint saved at one
TP/PP/DP loads at another. With the distributed optimizer (format `sharded`, the default) every
data-parallel rank writes only the ranges of the weights and optimizer state it owns, as
rectangles of the global tensors (megafox.checkpoint.sharding), and a resume reads only the
ranges it will own; format `gathered` is megatron-core's `fully_reshardable` save (the whole
state all-gathered to every rank first). Both hold the same tensors under the same keys.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from megafox.checkpoint.sharding import (OPTIMIZER_STATE_KEYS, OPTIMIZER_STATE_PREFIX, ddp_params,
                                         distributed_optimizers, owned_params, pop_param_entries, sharded_tensor)
from megafox.compat import megatron_core as mcore_compat
from megafox.records import SavedLayout


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """Keys as Megatron-LM uses them: `model`, or `model0`, `model1`... with virtual pipeline."""
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}

# checkpoint.format (megafox.config.CheckpointConfig): how the distributed optimizer's state is
# saved. Both write the same global tensors under the same keys, so either loads the other.
FORMATS = ("sharded", "gathered")
# `gathered`: megatron-core's `fully_reshardable` save, which all-gathers the whole optimizer
# state to every DP rank first (mcore 0.16 rejects the flattened tensors of
# `fully_sharded_model_space`).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def layout_signature() -> SavedLayout:

    return SavedLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                       vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
                       dp=ps.get_data_parallel_world_size(),
                       world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)


def get_rng_state() -> Dict[str, Any]:
    """Every RNG stream of this rank, as data `torch.load(weights_only=True)` reads back: tensors,
    lists, numbers (numpy's key array becomes a tensor)."""

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned (or what megafox saved before it converted numpy's
    state: a numpy array and tuples)."""

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded(state: Any):
    """One object per (pp, tp, dp) rank: RNG streams only mean something on the same layout."""

    lay = layout_signature()
    return ShardedObject("rng_state", state, (lay.pp, lay.tp, lay.dp),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def saves_by_range(optimizer, format: str = "sharded") -> bool:
    """Whether a training save writes only this rank's distributed-optimizer ranges (so the
    other ranks' updated weights need not be gathered first)."""
    return format == "sharded" and bool(distributed_optimizers(optimizer))


def training_state(chunks: List[torch.nn.Module], optimizer, format: str = "sharded") -> Tuple[Dict[str, Any], Any]:
    """The sharded state dict of a training save, and the save strategy it needs."""
    if format not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
    state = model_sharded_state_dict(chunks)
    strategy = None
    if saves_by_range(optimizer, format):
        state["optimizer"] = _optimizer_by_range(chunks, optimizer, state)
    else:
        with mcore_compat.optimizer_state_in_buffer_coordinates(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
        if format == "sharded":  # a non-distributed optimizer: its state is replicated over DP
            strategy = _spread_over_dp(torch_dist_strategy())
    state["rng_state"] = rng_sharded(get_rng_state())
    return state, strategy


def _optimizer_by_range(chunks: List[torch.nn.Module], optimizer, model_state: Dict[str, Any]) -> Dict[str, Any]:
    """The optimizer part of a `sharded` save; the model weights of the DDP parameters move from
    `model_state` into it as this rank's ranges (megafox.checkpoint.sharding)."""
    entries = pop_param_entries(model_state, ddp_params(chunks))
    parts = distributed_optimizers(optimizer)
    commons = [dict(part.state_dict(), param_state_sharding_type="fully_reshardable") for part, _ in parts]
    by_part: Dict[int, Dict[str, Any]] = {id(part): {} for part, _ in parts}
    for owned in owned_params(optimizer, entries):
        tensors = by_part[id(owned.optimizer)]
        shards = owned.state_shards()
        for piece in owned.pieces:
            where = f"{piece.key}@{','.join(map(str, piece.global_offset))}"
            tensors[f"weight:{where}"] = sharded_tensor(piece, owned.weight_shard())
            for name in OPTIMIZER_STATE_KEYS:
                tensors[f"{name}:{where}"] = sharded_tensor(
                    piece, shards[name], f"{owned.key_prefix}{OPTIMIZER_STATE_PREFIX}.{name}.")
    for common, (part, _) in zip(commons, parts):
        common["param_state"] = by_part[id(part)]
    return commons[0] if len(commons) == 1 else dict(enumerate(commons))


def torch_dist_strategy():

    return TorchDistSaveShardedStrategy("torch_dist", 1)


def _spread_over_dp(strategy):
    """Replicated tensors (the model, a non-distributed optimizer's state) written by all DP
    ranks in turn instead of by DP rank 0 alone (Megatron-LM's --ckpt-fully-parallel-save)."""

    if ps.get_data_parallel_world_size() == 1:
        return strategy
    return FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
