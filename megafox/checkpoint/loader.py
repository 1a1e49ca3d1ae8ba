"""Loading a checkpoint into a live model (and optimizer): the resume, and `load_model` for tools
and evaluation. Every file megatron-core unpickles on the way is read as data only
(megafox.compat.megatron_core.safe_checkpoint_loading, megafox.checkpoint.safe_load).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from megafox.checkpoint.errors import CheckpointError, checkpoint_errors_unwrapped
from megafox.checkpoint.layout import read_record
from megafox.checkpoint.sharding import (OPTIMIZER_STATE_PREFIX, ddp_params, distributed_optimizers, owned_params,
                                         pop_param_entries, sharded_tensor)
from megafox.checkpoint.state import (OPTIMIZER_METADATA, layout_signature, model_sharded_state_dict, rng_sharded,
                                      set_rng_state, unwrap)
from megafox.compat import megatron_core as mcore_compat
from megafox.records import CheckpointRecord


def load_model(root: Union[str, Path], chunks: List[torch.nn.Module],
               iteration: Union[int, str, None] = "latest") -> CheckpointRecord:
    """Load model weights (any saved TP/PP layout) into `chunks`; return the checkpoint's record."""

    record = read_record(root, iteration)
    with mcore_compat.safe_checkpoint_loading(), checkpoint_errors_unwrapped():
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), record.path)
    _load_chunks(chunks, loaded)
    return record


def _load_chunks(chunks: List[torch.nn.Module], loaded: Dict[str, Any]) -> None:
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)


def load_training_checkpoint(root: Union[str, Path], chunks: List[torch.nn.Module], optimizer,
                             iteration: Union[int, str, None] = "latest",
                             load_optimizer: bool = True) -> Tuple[CheckpointRecord, bool]:
    """Load model, optimizer and (when saved on this same layout) RNG states.

    Returns the record and whether the RNG streams were restored: the optimizer loads at any
    TP/PP/DP layout, but RNG streams are per rank and only mean something on the same layout.
    With the distributed optimizer each rank reads only its own ranges of the weights and of the
    optimizer state (whatever format and layout the checkpoint was saved with) and the weights
    are then all-gathered over DP, as after an optimizer step.
    """

    record = read_record(root, iteration)
    same_layout = record.layout == layout_signature()
    with mcore_compat.safe_checkpoint_loading():
        if load_optimizer and "optimizer" not in _saved_top_keys(record.path):
            raise CheckpointError(f"{record.path}: has no optimizer state (a model-only checkpoint); "
                                  "it can initialize weights but not resume training")
        state = model_sharded_state_dict(chunks)
        by_range = bool(distributed_optimizers(optimizer))
        if by_range:
            state["by_range"] = _prepare_load_by_range(record.path, chunks, optimizer, state, load_optimizer)
        elif load_optimizer:
            mcore_compat.init_torch_adam_state(optimizer)
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
        if same_layout:
            state["rng_state"] = rng_sharded(None)
        with checkpoint_errors_unwrapped():
            loaded = dist_checkpointing.load(state, record.path, sharded_strategy=None if by_range else _read_over_dp())
    _load_chunks(chunks, loaded)
    if by_range:
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)  # every rank's loaded ranges to every rank
        if not load_optimizer:
            optimizer.reload_model_params()
    elif load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        mcore_compat.unalias_adam_steps(optimizer)
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return record, same_layout


def _prepare_load_by_range(path: str, chunks: List[torch.nn.Module], optimizer, model_state: Dict[str, Any],
                           load_optimizer: bool) -> Dict[str, Any]:
    """Set the optimizer's non-tensor state (param groups, step) from common.pt and return the
    ShardedTensors that load this rank's ranges straight into the live tensors."""

    entries = pop_param_entries(model_state, ddp_params(chunks))
    parts = distributed_optimizers(optimizer)
    if load_optimizer:
        mcore_compat.init_torch_adam_state(optimizer)
        saved = dist_checkpointing.load_common_state_dict(path).get("optimizer")
        commons = [saved] if len(parts) == 1 else [saved.get(i, saved.get(str(i))) for i in range(len(parts))]
        for (part, _), common in zip(parts, commons):
            part.load_state_dict({k: v for k, v in common.items() if k not in ("param_state", "param_state_sharding_type")})
        mcore_compat.unalias_adam_steps(optimizer)
    targets: Dict[str, Any] = {}
    for owned in owned_params(optimizer, entries):
        shards = owned.state_shards() if load_optimizer else {}
        # fp32 training: the main weights are the model weights' memory; they come from the
        # optimizer state (the exact fp32 values), not twice
        weight = not (load_optimizer and owned.main_is_weight())
        for piece in owned.pieces:
            where = f"{piece.key}@{','.join(map(str, piece.global_offset))}"
            if weight:
                targets[f"weight:{where}"] = sharded_tensor(piece, owned.weight_shard())
            for name, shard in shards.items():
                targets[f"{name}:{where}"] = sharded_tensor(
                    piece, shard, f"{owned.key_prefix}{OPTIMIZER_STATE_PREFIX}.{name}.")
    return targets


def _read_over_dp():
    """Replicated tensors read once over the DP group and exchanged, not once per DP rank."""

    if ps.get_data_parallel_world_size() == 1:
        return None
    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _saved_top_keys(path: Union[str, Path]) -> set:

    with mcore_compat.safe_checkpoint_loading():
        return {key.split(".")[0] for key in dist_checkpointing.load_tensors_metadata(str(path))}
