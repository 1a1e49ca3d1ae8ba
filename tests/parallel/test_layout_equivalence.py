"""Same weights, same global batch: every TP/PP/DP layout takes the same optimizer step."""
import pytest
import torch

from megafox.config import fox1_tiny
from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state
from tests.support.compare import assert_same_step

pytestmark = pytest.mark.multirank

GLOBAL_BATCH, SEQ, MICRO = 8, 32, 1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equiv")
    model = fox1_tiny()
    torch.save(hf_state(model, seed=3), tmp / "hf.pt")
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ)
    loss_mask[1, :5] = 0  # uneven token counts per micro-batch exercise the per-token mean
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask}
    torch.save(batch, tmp / "batch.pt")
    return {"hf_path": str(tmp / "hf.pt"), "batch_path": str(tmp / "batch.pt")}


def _run(inputs, nproc, layout, **kw):
    return run_distributed("tests/parallel/bodies.py:one_step", nproc, layout,
                           dict(inputs, micro_batch_size=MICRO, **kw))


@pytest.fixture(scope="module")
def reference(inputs):
    return _run(inputs, 1, {})


def test_reference_step_changes_weights(reference, inputs):
    before = torch.load(inputs["hf_path"])
    assert reference["loss"] > 0 and reference["grad_norm"] > 0
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           reference["weights"]["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("name,nproc,layout", [
    ("tp2", 2, {"tensor_model_parallel_size": 2}),
    ("pp2", 2, {"pipeline_model_parallel_size": 2}),
    ("dp2_distopt", 2, {"use_distributed_optimizer": True}),
    ("pp2_vpp2", 2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}),
    ("tp2_pp2", 4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}),
])
def test_layout_matches_tp1(reference, inputs, name, nproc, layout):
    assert_same_step(reference, _run(inputs, nproc, layout), torch.load(inputs["hf_path"]))


@pytest.mark.parametrize("name,nproc,layout,nan_rank", [
    ("tp2", 2, {"tensor_model_parallel_size": 2}, 1),  # one TP shard's grads only
    ("pp2", 2, {"pipeline_model_parallel_size": 2}, 0),  # the stage without the loss
    ("dp2_distopt", 2, {"use_distributed_optimizer": True}, 1),
])
def test_nonfinite_grads_skip_the_step_on_every_rank(reference, inputs, name, nproc, layout, nan_rank):
    """A NaN gradient on one rank (finite loss) leaves every rank's weights untouched: the skip
    decision is global, or the ranks' weights would diverge."""
    got = _run(inputs, nproc, layout, nan_grad_rank=nan_rank)
    assert got["skipped"] and got["grad_norm"] != got["grad_norm"]  # NaN
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    before = torch.load(inputs["hf_path"])
    assert set(got["weights"]) == set(reference["weights"])
    for key, tensor in got["weights"].items():
        assert torch.equal(tensor, before[key]), f"{key} changed in a skipped step"


@pytest.fixture(scope="module")
def reference_two_steps(inputs):
    return _run(inputs, 1, {}, steps=2)


OVERLAP_ALL = {"overlap_grad_reduce": True, "overlap_param_gather": True, "ddp_bucket_size": 20000}


@pytest.mark.parametrize("name,nproc,layout,overlap,options", [
    ("dp2_distopt", 2, {"use_distributed_optimizer": True}, OVERLAP_ALL, {}),
    # the fused loss adds its weight gradient into main_grad and must still mark the weight ready
    ("dp2_distopt_fused_loss", 2, {"use_distributed_optimizer": True}, OVERLAP_ALL,
     {"fused_loss": True, "loss_chunk_tokens": 16}),
    # ... also where no other use of the weight gives it a gradient (the last stage's output layer)
    ("pp2_fused_loss", 2, {"pipeline_model_parallel_size": 2, "use_distributed_optimizer": True}, OVERLAP_ALL,
     {"fused_loss": True, "loss_chunk_tokens": 16}),
    ("dp2_allreduce", 2, {"use_distributed_optimizer": False},
     {"overlap_grad_reduce": True, "ddp_bucket_size": 20000}, {}),
    ("tp2_dp2_distopt", 4, {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True}, OVERLAP_ALL, {}),
])
def test_overlapped_grad_reduce_and_param_gather_match_tp1(reference_two_steps, inputs, name, nproc, layout,
                                                           overlap, options):
    """Several buckets (20K parameters each), gradients reduced during the backward and the
    second step's forward all-gathering the first step's updated shards bucket by bucket: the
    same two steps as one rank."""
    got = _run(inputs, nproc, layout, steps=2, overlap=overlap, options=options,
               use_distributed_optimizer=layout["use_distributed_optimizer"])
    assert_same_step(reference_two_steps, got, torch.load(inputs["hf_path"]))
