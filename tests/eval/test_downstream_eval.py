"""The in-loop evaluator around real training steps: scores logged every `interval` steps, and the
training run it sits in is bit-identical to the same run without it."""
import json
from pathlib import Path

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.eval.eval_helpers import peaked_hf_state, run_eval, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("downstream") / "hf.pt"
    torch.save(peaked_hf_state(tiny_model(), seed=3), path)
    return str(path)


def _run(staged, weights, layout, overlap=None):
    return run_distributed("tests/eval/bodies.py:with_and_without_evaluator", 2, layout, {
        "hf_path": weights, "tokenizer_path": str(staged["tokenizer"]), "task_yaml": str(staged["task_yaml"]),
        "data_dir": str(staged["data"]), "overlap": overlap}, timeout=600)


@pytest.fixture(scope="module")
def runs(staged, weights):
    return {
        # the evaluator inside a pipeline: rank 0 drives lm_eval, the last stage (rank 1) scores
        "pp2": _run(staged, weights, {"pipeline_model_parallel_size": 2}),
        # interleaved pipeline schedule (two virtual stages per rank)
        "pp2_vpp2": _run(staged, weights, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}),
        # data parallel with the distributed optimizer's deferred parameter all-gather
        "dp2_overlap": _run(staged, weights, {}, {"overlap_grad_reduce": True, "overlap_param_gather": True,
                                                  "ddp_bucket_size": 4000}),
    }


LAYOUTS = ["pp2", "pp2_vpp2", "dp2_overlap"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_is_bit_identical_with_the_evaluator(runs, layout):
    plain, evaluated = runs[layout]["plain"], runs[layout]["evaluated"]
    assert evaluated["losses"] == plain["losses"]  # exact, not approximately
    assert evaluated["weights_sum"] == plain["weights_sum"]
    # lm_eval reseeds python/numpy/torch; the evaluator must hand the streams back untouched
    assert torch.equal(evaluated["torch_rng"], plain["torch_rng"])
    assert evaluated["modes"] == plain["modes"] and all(plain["modes"])
    assert plain["losses"][-1] < plain["losses"][0]  # it did train


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_are_logged_every_interval(runs, layout):
    records = runs[layout]["evaluated"]["records"]
    assert [r["iteration"] for r in records] == [2, 4]
    assert [r["consumed_tokens"] for r in records] == [2 * 4 * 32, 4 * 4 * 32]
    for record in records:
        correct = record["eval/docstring_mc/acc_norm"] * 8  # a fraction of the 8 documents (limit=8)
        assert 0 <= correct <= 8 and correct == pytest.approx(round(correct), abs=1e-9), record
        assert record["eval/time_s"] > 0
    assert runs[layout]["evaluated"]["resets"] == 2  # evaluation time kept out of the throughput window
    assert runs[layout]["plain"]["records"] == []


def _hf_dir(weights, tokenizer, out: Path) -> Path:
    """The weights a run's evaluator scored, as a Hugging Face directory with its tokenizer."""
    from checkpoints_tools.hf_tokenizer import write_hf_tokenizer
    from megafox.config import fox1_tiny
    from tests.support.hf_reference import hf_llama

    model = fox1_tiny()  # what bodies.py trains
    hf = hf_llama(model)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied: lm_head is the embedding
    out.mkdir(parents=True)
    ids = write_hf_tokenizer(Path(tokenizer), out, model.max_position_embeddings)
    hf.config.bos_token_id = hf.generation_config.bos_token_id = ids["bos"]
    hf.config.eos_token_id = hf.generation_config.eos_token_id = ids["eos"]
    hf.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.mark.parametrize("layout, iteration", [("pp2", 2), ("dp2_overlap", 4)])
def test_logged_score_equals_lm_eval_on_the_weights_it_scored(runs, staged, tmp_path, layout, iteration):
    """The score logged in the loop equals lm_eval's own `hf` model on the same weights (gathered
    right after that step), with the same task, shots and documents. (The layouts agree with each
    other below, so two of the six scores cover them all.)"""
    evaluated = runs[layout]["evaluated"]
    logged = next(r for r in evaluated["records"] if r["iteration"] == iteration)
    hf_dir = _hf_dir(evaluated["snapshots"][iteration], staged["tokenizer"], tmp_path / "hf")
    proc = run_eval("--hf", hf_dir, "--tasks", f"{staged['task_yaml']}:1", "--limit", 8, "--batch-size", 3,
                    "--data-dir", staged["data"], "--output", tmp_path / "results", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "hf.json").read_text())
    theirs = next(r for r in report["tasks"] if r["task"] == "docstring_mc")
    assert theirs["metric"] == "acc_norm" and theirs["samples"] == 8, theirs
    assert logged["eval/docstring_mc/acc_norm"] == pytest.approx(theirs["value"], abs=1e-9), (logged, theirs)


def test_layouts_agree_on_the_scores(runs):
    """Same weights after the same steps (the training is layout-equivalent): same accuracy."""
    scores = [[r["eval/docstring_mc/acc_norm"] for r in runs[layout]["evaluated"]["records"]] for layout in LAYOUTS]
    assert scores[0] == scores[1] == scores[2]


def test_missing_task_data_stops_every_rank_at_start(staged, tmp_path):
    messages = run_distributed("tests/eval/bodies.py:missing_data", 2, {"pipeline_model_parallel_size": 2}, {
        "tokenizer_path": str(staged["tokenizer"]), "task_yaml": str(staged["task_yaml"]),
        "data_dir": str(tmp_path / "empty")}, timeout=300)
    assert messages is not None and messages[0] == messages[1]
    assert "docstring_mc" in messages[0] and str(tmp_path / "empty" / "docstring_mc") in messages[0]
