"""Optimizer state survives save -> load exactly, at the same layout and at others.

Three chained runs through the trainer's checkpoint functions (save_training_checkpoint /
load_training_checkpoint with a CheckpointRecord as the checkpointing callback builds it):
  A  DP2, distributed optimizer, overlapped grad reduce / param gather in 20K-parameter buckets
     (padded bucket ends): 2 steps, save, step 3; a fresh stack resumes from the save, step 3 again
  B  TP2: resumes A's checkpoint, step 3, save, step 4; a fresh TP2 stack resumes, step 4 again
  C  TP1, one rank: resumes B's checkpoint, step 4
  D  PP2: resumes B's checkpoint, step 4, save, step 5; a fresh PP2 stack resumes, step 5 again
  E  PP2 with 2 virtual stages per rank (interleaved schedule, one layer per chunk): resumes D's
     checkpoint, step 5, save, step 6; a fresh PP2+VPP2 stack resumes, step 6 again
Every fp32 main parameter, exp_avg and exp_avg_sq is read from megatron-core's optimizer per
parameter (the distributed optimizer's shard of it on each DP rank, summed over DP into zeros,
every element owned exactly once), mapped to HF names without padding, and compared tensor by
tensor: exactly equal after every load. The step after a same-layout resume is bit-identical to
the uninterrupted one; after a layout change it agrees to 1e-5.
"""
import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state
from tests.independent.bodies import STATE_KEYS, tiny_model
from tests.independent.reference import SETTINGS, make_batches

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

VOCAB = 1000  # padded to 1024 rows at TP1 and TP2: the padding rows' state is dropped before comparing
OVERLAP = {"overlap_grad_reduce": True, "overlap_param_gather": True, "ddp_bucket_size": 20000}
CROSS_LAYOUT_TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optstate")
    torch.save(hf_state(tiny_model(VOCAB), seed=21), tmp / "hf.pt")
    torch.save(make_batches(VOCAB, steps=6, seed=17), tmp / "batches.pt")
    common = {"batches_path": str(tmp / "batches.pt"), "micro_batch_size": 2, "vocab_size": VOCAB,
              "settings": SETTINGS}
    a = run_distributed("tests/independent/bodies.py:resume_cycle", 2, {"use_distributed_optimizer": True},
                        dict(common, hf_path=str(tmp / "hf.pt"), root_out=str(tmp / "A"), steps_before_save=2,
                             overlap=OVERLAP))
    b = run_distributed("tests/independent/bodies.py:resume_cycle", 2, {"tensor_model_parallel_size": 2},
                        dict(common, root_in=str(tmp / "A"), root_out=str(tmp / "B"), steps_before_save=1))
    c = run_distributed("tests/independent/bodies.py:resume_cycle", 1, {},
                        dict(common, root_in=str(tmp / "B"), steps_before_save=1))
    d = run_distributed("tests/independent/bodies.py:resume_cycle", 2, {"pipeline_model_parallel_size": 2},
                        dict(common, root_in=str(tmp / "B"), root_out=str(tmp / "D"), steps_before_save=1))
    e = run_distributed("tests/independent/bodies.py:resume_cycle", 2,
                        {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
                        dict(common, root_in=str(tmp / "D"), root_out=str(tmp / "E"), steps_before_save=1))
    return {"A": a, "B": b, "C": c, "D": d, "E": e}


def assert_state_equal(got, expected, what):
    for key in STATE_KEYS:
        assert set(got["state"][key]) == set(expected["state"][key]), (what, key)
        for name, tensor in expected["state"][key].items():
            assert torch.equal(got["state"][key][name], tensor), f"{what}: {key} of {name} differs"
    assert got["state"]["steps"] == expected["state"]["steps"], what
    for name, tensor in expected["weights"].items():
        assert torch.equal(got["weights"][name], tensor), f"{what}: weight {name} differs"


def assert_step_equal(got, expected, what, tol=0.0):
    assert abs(got["loss"] - expected["loss"]) <= tol * abs(expected["loss"]), (what, got["loss"], expected["loss"])
    assert abs(got["grad_norm"] - expected["grad_norm"]) <= tol * expected["grad_norm"], what
    for name, tensor in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=0, atol=tol, msg=lambda m: f"{what} {name}: {m}")


def test_saved_state_is_a_real_adam_state(runs):
    saved = runs["A"]["saved"]
    assert saved["state"]["steps"] == [2.0]
    for name, weight in saved["weights"].items():
        assert torch.equal(saved["state"]["param"][name], weight), f"fp32 main param of {name} is not the weight"
        assert saved["state"]["exp_avg"][name].abs().max() > 0, name
        assert saved["state"]["exp_avg_sq"][name].min() >= 0 and saved["state"]["exp_avg_sq"][name].max() > 0, name


# (run, layout, saved at step or None, the step re-run after its own resume)
SAME_LAYOUT = [("A", "DP2", None, 3), ("B", "TP2", 3, 4), ("D", "PP2", 4, 5), ("E", "PP2+VPP2", 5, 6)]
# (saved by, loaded by, the loader's layout, the first step it trains)
LAYOUT_CHANGES = [("A", "B", "TP2", 3), ("B", "C", "TP1", 4), ("B", "D", "PP2", 4), ("D", "E", "PP2+VPP2", 5)]


@pytest.mark.parametrize("run,layout,saved_at,step", SAME_LAYOUT, ids=[row[1] for row in SAME_LAYOUT])
def test_same_layout_resume(runs, run, layout, saved_at, step):
    r = runs[run]
    if saved_at is not None:
        assert r["saved"]["state"]["steps"] == [float(saved_at)]
    assert_state_equal(r["reloaded"], r["saved"], f"{layout} -> {layout}")
    assert_step_equal(r["after_reload"], r["after_save"], f"{layout} step {step} after resume")


@pytest.mark.parametrize("src,dst,layout,step", LAYOUT_CHANGES, ids=[f"{a}-{b}" for a, b, *_ in LAYOUT_CHANGES])
def test_layout_change_resume(runs, src, dst, layout, step):
    saved, loaded = runs[src], runs[dst]
    assert_state_equal(loaded["loaded"], saved["saved"], f"{src} -> {layout}")
    assert_step_equal(loaded["steps"][0], saved["after_save"], f"{layout} step {step} after resume", CROSS_LAYOUT_TOL)
