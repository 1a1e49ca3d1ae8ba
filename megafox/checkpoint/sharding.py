"""Each data-parallel rank saves, and on resume reads, only the part of the state it owns.

With megatron-core's distributed optimizer every DP rank owns one contiguous range of each DDP
bucket: for every parameter, a contiguous range of its flattened (TP-local) tensor, for which it
holds the fp32 main weights and both Adam moments. megatron-core's `fully_reshardable` format
all-gathers every rank's ranges to every rank before saving (extra memory of the whole state on
each rank, and rank 0 writing all of it); `dp_reshardable` writes the ranges as they are, but in
bucket coordinates that only load at the same TP/PP.

Here each rank writes its ranges *in model coordinates*: a flat range of a tensor is cut into at
most three rectangles (a partial first row, whole rows, a partial last row, recursively for more
dimensions), each a plain view of the rank's own shard, placed in the same global tensors under
the same keys (`optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`, and the model weights
under their own keys) as `fully_reshardable` uses. megatron-core (>= 0.14 on torch >= 2.6) saves
such uneven shards as ordinary DCP chunks. So

- a save moves no data between ranks, each rank writes ~1/DP of the state and needs no more
  memory than a copy of its own shard;
- the checkpoint is a normal global-tensor checkpoint: any TP/PP/DP layout loads it (each rank
  asks for the rectangles of its own new ranges; DCP reads the overlapping chunks), and so do the
  offline tools (checkpoints_tools), which read global tensors whatever the chunks;
- a resume reads, per rank, its own ranges (plus the model weights' ranges, all-gathered over DP
  afterwards exactly as after an optimizer step).

ShardedTensorFactory entries (the SwiGLU fc1 weight, stored as [all gate rows; all up rows])
are resolved by running the factory's build function on a meta tensor of the local shape: every
part it returns is a view whose storage offset says which elements of the local tensor land where
in the global one.

Which range a rank owns comes from the DistributedOptimizer itself (`gbuf_ranges`,
`_get_main_param_and_optimizer_states`, megatron-core 0.16); tests/checkpoint compare every saved
tensor with megatron-core's own `fully_reshardable` save, so an upgrade that changes them fails there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

import torch

OPTIMIZER_STATE_PREFIX = "optimizer.state"
OPTIMIZER_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")  # as megatron-core's fully_reshardable names them


@dataclass(frozen=True)
class Piece:
    """A rectangle of one global tensor, equal to the flat range [start, stop) of a rank's shard of
    one parameter (offsets relative to the start of the rank's owned range)."""

    key: str
    global_shape: Tuple[int, ...]
    global_offset: Tuple[int, ...]
    local_shape: Tuple[int, ...]  # with the stacked-layer axes as leading 1s
    replica_id: Any
    allow_shape_mismatch: bool
    start: int
    stop: int


def flat_range_rectangles(shape: Tuple[int, ...], begin: int, end: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...], int]]:
    """The flat range [begin, end) of a row-major tensor of `shape` as rectangles
    (offset, size, flat start), each itself a contiguous flat range: at most 2 x ndim - 1 of them."""
    if begin >= end:
        return []
    if len(shape) <= 1:
        return [((begin,), (end - begin,), begin)]
    inner = 1
    for dim in shape[1:]:
        inner *= dim
    if begin % inner == 0 and end % inner == 0:
        return [((begin // inner,) + (0,) * (len(shape) - 1), ((end - begin) // inner,) + tuple(shape[1:]), begin)]
    out = []
    first_row, last_row = begin // inner, (end - 1) // inner
    if first_row == last_row:  # inside one row: recurse into it
        return [((first_row,) + off, (1,) + size, first_row * inner + start)
                for off, size, start in flat_range_rectangles(shape[1:], begin - first_row * inner, end - first_row * inner)]
    head_end = (first_row + 1) * inner if begin % inner else begin
    tail_begin = last_row * inner if end % inner else end
    if begin < head_end:
        out += flat_range_rectangles(shape, begin, head_end)
    if head_end < tail_begin:
        out += flat_range_rectangles(shape, head_end, tail_begin)
    if tail_begin < end:
        out += flat_range_rectangles(shape, tail_begin, end)
    return out


def _parts(sharded) -> List[Any]:
    """The plain ShardedTensors a model entry is stored as, each over a view of a meta tensor of
    the local tensor's shape: the view's storage offset says where its elements start in the
    local tensor (a factory is built on that meta tensor to find out; nothing is allocated)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    probe = torch.empty(tuple(sharded.data.shape), dtype=sharded.data.dtype, device="meta")
    if isinstance(sharded, ShardedTensor):
        parts = [_with_data(sharded, probe)]
    elif isinstance(sharded, ShardedTensorFactory):
        parts = list(_flatten(sharded.build_fn(sharded.key, probe, sharded.replica_id, None)))
    else:
        raise TypeError(f"{getattr(sharded, 'key', sharded)}: {type(sharded).__name__} cannot be sharded by range")
    for part in parts:
        if not isinstance(part, ShardedTensor):
            raise TypeError(f"{sharded.key}: its factory built a {type(part).__name__}, not a ShardedTensor")
        if not part.data.is_contiguous():  # a contiguous view of a contiguous tensor is one flat run
            raise ValueError(f"{sharded.key}: a part of its local tensor is not contiguous; cannot be saved by range")
    return parts


def _with_data(sharded, data):
    from dataclasses import replace

    return replace(sharded, data=data, dtype=data.dtype)


def _flatten(built) -> Iterator[Any]:
    if isinstance(built, dict):
        for value in built.values():
            yield from _flatten(value)
    elif isinstance(built, (list, tuple)):
        for value in built:
            yield from _flatten(value)
    else:
        yield built


def pieces(sharded, owned_start: int, owned_stop: int, dp_free_replica_id: Any) -> List[Piece]:
    """The rectangles of `sharded` (a model ShardedTensor or ShardedTensorFactory of one parameter)
    that hold the flat elements [owned_start, owned_stop) of the parameter's local tensor."""
    out = []
    for part in _parts(sharded):
        first, count = part.data.storage_offset(), part.data.numel()
        begin, end = max(owned_start, first), min(owned_stop, first + count)
        if begin >= end:
            continue
        lead = part.prepend_axis_num
        for offset, size, start in flat_range_rectangles(tuple(part.local_shape), begin - first, end - first):
            global_offset = tuple(part.global_offset[:lead]) + tuple(
                o + r for o, r in zip(part.global_offset[lead:], offset))
            out.append(Piece(part.key, tuple(part.global_shape), global_offset, (1,) * lead + tuple(size),
                             dp_free_replica_id, part.allow_shape_mismatch,
                             first + start - owned_start, first + start + _numel(size) - owned_start))
    return out


def _numel(size) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def sharded_tensor(piece: Piece, flat: torch.Tensor, key_prefix: str = ""):
    """The ShardedTensor of `piece` over `flat` (this rank's 1-D shard of one parameter's state)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    data = flat[piece.start:piece.stop].view(piece.local_shape)
    return ShardedTensor(key_prefix + piece.key, data, data.dtype, piece.local_shape, piece.global_shape,
                         piece.global_offset, None, piece.replica_id, 0, piece.allow_shape_mismatch)


# ----------------------------------------------------------------------------------------------
# the distributed optimizer's ownership

@dataclass
class OwnedParam:
    """One parameter of which this rank owns elements [start, stop) of the flattened local tensor."""

    param: torch.nn.Parameter  # the model parameter (a view into the DDP param buffer)
    start: int
    stop: int
    optimizer: Any  # the DistributedOptimizer that owns it
    key_prefix: str  # "" or ChainedOptimizer's "chained_<i>." when several are chained
    pieces: List[Piece]

    def weight_shard(self) -> torch.Tensor:
        return self.param.detach().view(-1)[self.start:self.stop]

    def state_shards(self) -> Dict[str, torch.Tensor]:
        """The fp32 main weights and Adam moments of the owned range (live tensors, 1-D)."""
        tensors = self.optimizer._get_main_param_and_optimizer_states(self.param)
        return {k: tensors[k].detach().view(-1) for k in OPTIMIZER_STATE_KEYS}

    def main_is_weight(self) -> bool:
        """fp32 training: the optimizer's main weights are views of the model weights themselves."""
        main = self.state_shards()["param"]
        return main.dtype == self.param.dtype and main.data_ptr() == self.weight_shard().data_ptr()


def distributed_optimizers(optimizer) -> List[Tuple[Any, str]]:
    """(DistributedOptimizer, key prefix) for each one in `optimizer` (possibly chained); empty
    when `optimizer` is not distributed (or None)."""
    if optimizer is None:
        return []
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if not parts or not all(isinstance(p, DistributedOptimizer) for p in parts):
        return []
    return [(p, "" if len(parts) == 1 else f"chained_{i}.") for i, p in enumerate(parts)]


def ddp_params(chunks) -> Dict[int, torch.nn.Parameter]:
    """Every parameter held in a DDP buffer of `chunks` (owned here or by another DP rank), by id."""
    out = {}
    for chunk in chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            for param in buffer.params:
                out[id(param)] = param
    return out


def owned_params(optimizer, model_entries: Dict[int, Any]) -> List[OwnedParam]:
    """This rank's ranges of every parameter, in the optimizer's (deterministic) bucket order.
    `model_entries`: the model sharded state dict's entry of each parameter, by id(parameter)."""
    out = []
    for part, prefix in distributed_optimizers(optimizer):
        if getattr(part, "distributed_optimizer_instance_id", 0) != 0:
            raise NotImplementedError("several distributed-optimizer instances are not supported by the sharded format")
        for gbuf_range_maps in part.gbuf_ranges:
            for gbuf_range_map_for_all_buckets in gbuf_range_maps.values():
                for gbuf_range_map in gbuf_range_map_for_all_buckets:
                    for param, range_map in gbuf_range_map["param_map"].items():
                        entry = model_entries.get(id(param))
                        if entry is None:
                            raise KeyError(f"a parameter of shape {tuple(param.shape)} has no entry in the model's "
                                           "sharded state dict")
                        owned = range_map["param"]
                        out.append(OwnedParam(param, owned.start, owned.end, part, prefix,
                                              pieces(entry, owned.start, owned.end, dp_free(entry.replica_id))))
    return out


def dp_free(replica_id: Any) -> Any:
    """The replica id with its data-parallel coordinate cleared: a rank's own range has no replica
    on the other DP ranks (megatron-core's model replica ids are (pipeline/tie, tensor, data))."""
    if isinstance(replica_id, tuple) and len(replica_id) == 3:
        return (replica_id[0], replica_id[1], 0)
    if replica_id == 0:
        return 0
    raise ValueError(f"unexpected replica id {replica_id!r} (megatron-core uses (pp, tp, dp) tuples)")


def pop_param_entries(model_state: Dict[str, Any], params: Dict[int, torch.nn.Parameter]) -> Dict[int, Any]:
    """Remove the entries of DDP parameters from a model sharded state dict (in place) and return
    them by id(parameter); what stays (e.g. `_extra_state` objects) is saved and loaded as usual."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    taken: Dict[int, Any] = {}

    def walk(node):
        for name in list(node):
            value = node[name]
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, (ShardedTensor, ShardedTensorFactory)) and id(value.data) in params:
                taken[id(value.data)] = value
                del node[name]

    walk(model_state)
    return taken
