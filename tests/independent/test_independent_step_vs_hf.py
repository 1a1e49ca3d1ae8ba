"""One megafox training step (through the test bodies' copy of the trainer's step) against
transformers' LlamaForCausalLM trained by plain torch: what the padded vocabulary rows do.

The real trainer (megafox-train through launch/local.sh, every step of a two-stage curriculum at
1 rank, TP2 and PP2, fp32 and bf16) is compared with the same reference in
test_independent_trainer_vs_hf.py; this file keeps the reference's own checks and the padded-
vocabulary case. The reference (tests/independent/reference.py) is written from the definitions:
HF forward, loss = sum(mask * token_loss) / sum(mask) over the global batch, backward,
torch.nn.utils.clip_grad_norm_, torch.optim.AdamW with weight decay on the matrices only.
"""
import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state
from tests.independent.bodies import tiny_model
from tests.independent.reference import SETTINGS, hf_train, hf_weights_padded, make_batches

pytestmark = pytest.mark.multirank

TOL = 1e-5
UNPADDED_VOCAB = 1024  # a multiple of 128: megafox's embedding has no padding rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vs_hf")
    model = tiny_model(UNPADDED_VOCAB)
    state = hf_state(model, seed=5)
    batches = make_batches(model.vocab_size)
    torch.save(state, tmp / "hf.pt")
    torch.save(batches, tmp / "batches.pt")
    return {"model": model, "state": state, "batches": batches, "hf_path": str(tmp / "hf.pt"),
            "batches_path": str(tmp / "batches.pt")}


@pytest.fixture(scope="module")
def reference(inputs):
    return hf_train(inputs["model"], inputs["state"], inputs["batches"])


def _run(inputs, vocab_size=UNPADDED_VOCAB, hf_path=None, batches_path=None):
    return {"hf_path": hf_path or inputs["hf_path"], "batches_path": batches_path or inputs["batches_path"],
            "micro_batch_size": 1, "vocab_size": vocab_size, "settings": SETTINGS}


@pytest.fixture(scope="module")
def padded_vocab_inputs(inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vs_hf_padded")
    model = tiny_model(1000)
    state = hf_state(model, seed=5)
    batches = [dict(b, tokens=b["tokens"] % 1000, labels=b["labels"] % 1000) for b in inputs["batches"]]
    torch.save(state, tmp / "hf.pt")
    torch.save(batches, tmp / "batches.pt")
    return {"model": model, "state": state, "batches": batches,
            "run": _run(inputs, 1000, str(tmp / "hf.pt"), str(tmp / "batches.pt"))}


@pytest.fixture(scope="module")
def megafox_tp1(padded_vocab_inputs):
    """The single-rank run of the padded (1000 tokens in 1024 rows) model. The unpadded model's
    step is compared with transformers by test_independent_trainer_vs_hf.py, through the real trainer."""
    (padded,) = run_distributed("tests/independent/bodies.py:train_runs", 1, {},
                                {"runs": [padded_vocab_inputs["run"]]})
    return {"padded": padded}


def max_weight_diff(a, b, rows=None):
    return max((a[k][:rows] if rows else a[k]).sub(b[k][:rows] if rows else b[k]).abs().max().item() for k in a)


def assert_matches_reference(got, ref, rows=None):
    for step, (g, r) in enumerate(zip(got, ref), 1):
        assert g["tokens"] == r["tokens"]
        assert abs(g["loss"] - r["loss"]) < TOL, (step, g["loss"], r["loss"])
        assert abs(g["grad_norm"] - r["grad_norm"]) < TOL, (step, g["grad_norm"], r["grad_norm"])
        assert set(g["weights"]) == set(r["weights"]) - {"lm_head.weight"}  # tied: the embedding
        for name, tensor in g["weights"].items():
            expected = r["weights"][name][:rows] if rows else r["weights"][name]
            torch.testing.assert_close(tensor, expected, rtol=0, atol=TOL, msg=lambda m: f"step {step} {name}: {m}")


def test_reference_settings_make_every_path_matter(inputs, reference):
    """The comparison can fail: clipping is active and both clipping and decaying the norms move
    weights by far more than the tolerance; every parameter is updated."""
    for step in reference:
        assert step["grad_norm"] > 2 * SETTINGS["clip_grad"]
    final = reference[-1]["weights"]
    unclipped = hf_train(inputs["model"], inputs["state"], inputs["batches"], clip=False)[-1]["weights"]
    decayed = hf_train(inputs["model"], inputs["state"], inputs["batches"], decay_1d=True)[-1]["weights"]
    assert max_weight_diff(unclipped, final) > 100 * TOL
    assert max((decayed[k] - final[k]).abs().max().item() for k in final if k.endswith("norm.weight")) > 100 * TOL
    for name, tensor in final.items():
        assert (tensor - inputs["state"][name]).abs().max() > 100 * TOL, f"{name} barely moved"


def _padded_vocab_reference(padded_vocab_inputs):
    """transformers on the 1000-row model (what megafox-to-hf exports), and checks that the
    comparison can fail: with the vocabulary zero-padded to 1024 rows in the softmax (Megatron-LM's
    behaviour) the loss differs by far more than the tolerance."""
    model, state, batches = padded_vocab_inputs["model"], padded_vocab_inputs["state"], padded_vocab_inputs["batches"]
    ref = hf_train(model, state, batches)
    padded = hf_train(model, hf_weights_padded(state, UNPADDED_VOCAB), batches, vocab_size=UNPADDED_VOCAB)
    assert abs(padded[0]["loss"] - ref[0]["loss"]) > 100 * TOL
    return ref


def test_padded_vocabulary_is_left_out_of_the_softmax(megafox_tp1, padded_vocab_inputs):
    """fox1-tiny's 1000-token vocabulary is padded to 1024 rows, which take no part in the
    softmax: the step (loss, grad norm, every weight) equals transformers' on the 1000-row model,
    i.e. the model trained is the model exported."""
    assert_matches_reference(megafox_tp1["padded"], _padded_vocab_reference(padded_vocab_inputs))


def test_padded_vocabulary_is_left_out_of_the_softmax_at_tp2(padded_vocab_inputs):
    """The same at TP2, where the padded rows are the end of the second rank's vocab shard."""
    got = run_distributed("tests/independent/bodies.py:train_runs", 2, {"tensor_model_parallel_size": 2},
                          {"runs": [padded_vocab_inputs["run"]]})[0]
    assert_matches_reference(got, _padded_vocab_reference(padded_vocab_inputs))
