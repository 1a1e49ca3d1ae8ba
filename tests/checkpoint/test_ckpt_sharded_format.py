"""The `sharded` training-checkpoint format against megatron-core's own `fully_reshardable` save
(format `gathered`) as the reference: the same state saved both ways holds bit-identical tensors
under the same keys, each DP rank writes about half of a DP2 checkpoint (the reference: rank 0
all of it), and a checkpoint loaded at another TP/PP/DP layout, saved again by the reference,
gives the reference's tensors back bit for bit, and training continues as the uninterrupted run.
"""
import pytest
import torch

from megafox.checkpoint.reader import DistCheckpoint
from tests.support.distributed import run_distributed

pytestmark = pytest.mark.multirank
BODIES = "tests/checkpoint/bodies.py"
STEPS = 2


def differing(a, b):
    """Keys whose global tensors differ between two checkpoints (which must hold the same keys)."""
    x, y = DistCheckpoint(a), DistCheckpoint(b)
    assert sorted(x.tensors) == sorted(y.tensors)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in x.tensors)
    return [k for k in sorted(x.tensors) if not torch.equal(x.read({k: None})[k], y.read({k: None})[k])]


def saved(tmp_path_factory, name, **kwargs):
    tmp = tmp_path_factory.mktemp(name)
    roots = {"sharded": str(tmp / "sharded"), "gathered": str(tmp / "gathered")}
    out = run_distributed(f"{BODIES}:train_and_save", 2, {}, dict(roots=roots, steps=STEPS, **kwargs))
    reference = run_distributed(f"{BODIES}:continue_training", 2, {},
                                dict(steps_total=STEPS + 2, **{k: v for k, v in kwargs.items() if k != "async_save"}))
    return dict(out, tmp=tmp, reference=reference, kwargs=kwargs)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """DP2, distributed optimizer, fp32: 2 steps, saved in both formats."""
    return saved(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def bf16_overlap(tmp_path_factory):
    """bf16 (fp32 main weights apart from the bf16 model), overlapped grad reduce and param gather
    in 20K-parameter buckets (padded bucket ends), saved asynchronously."""
    return saved(tmp_path_factory, "bf16", precision="bf16", overlap=True, async_save=True)


@pytest.mark.parametrize("run", ["fp32", "bf16_overlap"])
def test_same_tensors_as_megatron_core_and_each_rank_writes_half(run, request):
    got = request.getfixturevalue(run)
    tmp = got["tmp"]
    assert differing(tmp / "sharded", tmp / "gathered") == []
    sharded = [w["sharded"] for w in got["written"]]
    gathered = [w["gathered"] for w in got["written"]]
    assert gathered[1] < 0.02 * gathered[0]  # the reference: DP rank 0 writes everything
    for part in sharded:
        assert abs(part - sum(sharded) / 2) < 0.05 * sum(sharded), sharded
    assert got["losses"] == got["reference"][:STEPS]


LAYOUTS = {"same DP2": (2, {}), "TP2": (2, {"tensor_model_parallel_size": 2}),
           "PP2": (2, {"pipeline_model_parallel_size": 2}), "one rank": (1, {})}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loads_at_another_layout_exactly(fp32, layout):
    nproc, parallel = LAYOUTS[layout]
    dst = fp32["tmp"] / f"resaved {layout}"
    out = run_distributed(f"{BODIES}:load_and_resave", nproc, parallel,
                          {"src": str(fp32["tmp"] / "sharded"), "dst": str(dst), "steps_after": 2})
    assert differing(dst, fp32["tmp"] / "gathered") == []
    assert out["same_layout"] == (layout == "same DP2")
    expected = fp32["reference"][STEPS:]
    if layout == "same DP2":  # the same arithmetic as the uninterrupted run
        assert out["losses"] == expected
    else:
        assert out["losses"] == pytest.approx(expected, rel=1e-6)


def test_bf16_with_overlapped_buckets_resumes_bit_exact_and_at_one_rank(bf16_overlap):
    got = bf16_overlap
    for nproc in (2, 1):
        dst = got["tmp"] / f"resaved {nproc}"
        out = run_distributed(f"{BODIES}:load_and_resave", nproc, {},
                              {"src": str(got["tmp"] / "sharded"), "dst": str(dst), "steps_after": 2,
                               "precision": "bf16", "overlap": True})
        assert differing(dst, got["tmp"] / "gathered") == []
        if nproc == 2:
            assert out["losses"] == got["reference"][STEPS:]
        else:  # DP1 sums the gradients in another order
            assert out["losses"] == pytest.approx(got["reference"][STEPS:], rel=1e-5)


def test_without_the_distributed_optimizer_dp_ranks_share_the_writes(tmp_path_factory):
    """A replicated optimizer state: megatron-core's fully parallel save spreads it over DP."""
    got = saved(tmp_path_factory, "nodistopt", distributed_optimizer=False)
    tmp = got["tmp"]
    assert differing(tmp / "sharded", tmp / "gathered") == []
    sharded = [w["sharded"] for w in got["written"]]
    assert min(sharded) > 0.4 * sum(sharded), sharded
    out = run_distributed(f"{BODIES}:load_and_resave", 2, {},
                          {"src": str(tmp / "sharded"), "dst": str(tmp / "resaved"), "steps_after": 2,
                           "distributed_optimizer": False})
    assert differing(tmp / "resaved", tmp / "gathered") == []
    assert out["losses"] == got["reference"][STEPS:]


def test_a_gathered_checkpoint_loads_by_range_too(fp32):
    """What megafox saved before the `sharded` format (whole tensors, rank 0) resumes the same way."""
    dst = fp32["tmp"] / "resaved from gathered"
    out = run_distributed(f"{BODIES}:load_and_resave", 2, {"tensor_model_parallel_size": 2},
                          {"src": str(fp32["tmp"] / "gathered"), "dst": str(dst), "steps_after": 2})
    assert differing(dst, fp32["tmp"] / "gathered") == []
    assert out["losses"] == pytest.approx(fp32["reference"][STEPS:], rel=1e-6)
