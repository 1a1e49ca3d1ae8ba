"""The pieces of the `sharded` checkpoint format and of safe loading, without a process group:
the flat-range -> rectangles cut, the SwiGLU factory resolved through its own build function,
RNG state that `weights_only` loading reads back exactly, and the load-time patches."""
import io
import pickle
import random

import numpy as np
import pytest
import torch

from megafox.checkpoint.sharding import flat_range_rectangles, pieces


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3), (1, 6)])
def test_every_flat_range_is_covered_exactly_once_by_contiguous_rectangles(shape):
    n = int(np.prod(shape))
    index = torch.arange(n).view(shape)
    for begin in range(n + 1):
        for end in range(begin, n + 1):
            hits = torch.zeros(shape, dtype=torch.int)
            rects = flat_range_rectangles(shape, begin, end)
            assert len(rects) <= max(0, 2 * len(shape) - 1)
            for offset, size, start in rects:
                where = tuple(slice(o, o + s) for o, s in zip(offset, size))
                hits[where] += 1
                # each rectangle is itself one contiguous run of the flat tensor, starting at `start`
                assert torch.equal(index[where].reshape(-1), torch.arange(start, start + index[where].numel()))
            flat = hits.view(-1)
            assert torch.all(flat[begin:end] == 1) and flat[:begin].sum() == 0 and flat[end:].sum() == 0


def _fc1_factory(tp_rank: int, tp: int, rows: int = 8, cols: int = 3, layer: int = 1, layers: int = 2):
    """megatron-core's own SwiGLU factory for a local fc1 weight [gate; up] of `rows` rows."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    weight = torch.zeros(rows, cols)
    offsets = ((0, layer, layers),)
    original = ShardedTensor.from_rank_offsets("fc1", weight, *offsets, (1, tp_rank, tp), replica_id=(0, 0, 3),
                                               prepend_axis_num=1)
    return weight, apply_swiglu_sharded_factory(original, offsets)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_swiglu_factory_pieces_land_where_the_factory_puts_each_row(tp_rank):
    """A DP range across the gate/up boundary of a TP-local fc1: every element of the range goes to
    the global position megatron-core's factory gives its row (gate rows first, all TP ranks'
    gates, then all up rows), the DP coordinate of the replica id is cleared."""
    tp, rows, cols = 2, 8, 3
    weight, factory = _fc1_factory(tp_rank, tp, rows, cols)
    values = torch.arange(rows * cols, dtype=torch.float32)
    start, stop = 5, 20  # inside gate row 1 .. inside up row 2
    found = pieces(factory, start, stop, (0, 0, 0))
    glob = torch.full((2, tp * rows, cols), -1.0)
    for piece in found:
        assert piece.key == "fc1" and piece.global_shape == (2, tp * rows, cols) and piece.replica_id == (0, 0, 0)
        where = tuple(slice(o, o + s) for o, s in zip(piece.global_offset, piece.local_shape))
        glob[where] = values[start:stop][piece.start:piece.stop].view(piece.local_shape)
    half = rows // 2
    for flat in range(start, stop):
        row, col = divmod(flat, cols)
        g_row = (tp_rank * half + row) if row < half else (tp * half + tp_rank * half + row - half)
        assert glob[1, g_row, col] == values[flat], (flat, row, col)
    assert int((glob >= 0).sum()) == stop - start


def test_rng_state_round_trips_through_weights_only_load():
    from megafox.checkpoint.state import get_rng_state, set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.random(), np.random.rand(), torch.rand(1)
    state = get_rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)  # what a resume may unpickle
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(restored)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_rng_state_saved_before_the_conversion_still_restores():
    """Checkpoints of earlier megafox versions hold numpy's state as an array and python's as tuples."""
    from megafox.checkpoint.state import get_rng_state, set_rng_state

    np.random.seed(9)
    old = dict(get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    expected = (random.random(), float(np.random.rand()))
    np.random.seed(1), random.seed(1)
    set_rng_state(old)
    assert (random.random(), float(np.random.rand())) == expected


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_safe_loading_patches_nest_and_are_undone():
    from megatron.core.dist_checkpointing.strategies import common, torch as torch_strategy

    from megafox.compat.megatron_core import safe_checkpoint_loading

    before = (torch_strategy._get_filesystem_reader, torch_strategy.MCoreLoadPlanner,
              common.TorchCommonLoadStrategy.load_common)
    with safe_checkpoint_loading():
        inside = torch_strategy.MCoreLoadPlanner
        with safe_checkpoint_loading():
            assert torch_strategy.MCoreLoadPlanner is inside
        assert torch_strategy.MCoreLoadPlanner is inside and inside is not before[1]
        assert issubclass(inside, before[1])
    assert (torch_strategy._get_filesystem_reader, torch_strategy.MCoreLoadPlanner,
            common.TorchCommonLoadStrategy.load_common) == before


def test_check_loads_without_code_names_a_planted_common_pt(tmp_path):
    from megafox.checkpoint.integrity import check_loads_without_code
    from torch.distributed.checkpoint.metadata import Metadata

    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata={}), f)
    torch.save({"optimizer": {"param_groups": []}}, tmp_path / "common.pt")
    assert check_loads_without_code(tmp_path) is None
    torch.save({"x": _Payload()}, tmp_path / "common.pt")  # torch's own format, as megatron-core writes it
    problem = check_loads_without_code(tmp_path)
    assert problem == f"{tmp_path / 'common.pt'}: refused to load: it references posix.system, which is not " \
                      "checkpoint data (unpickling it could run code from the file)"
    with open(tmp_path / "common.pt", "wb") as f:  # a bare pickle
        pickle.dump({"x": _Payload()}, f)
    assert check_loads_without_code(tmp_path).startswith(f"{tmp_path / 'common.pt'}: refused to load")
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(_Payload(), f)
    assert "posix.system" in check_loads_without_code(tmp_path)
