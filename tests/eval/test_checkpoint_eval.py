"""`megafox eval --checkpoint` (in-process, megafox's own model) against lm_eval's `hf` model on the
checkpoint's HF export, and against itself at TP2 x PP2, DP2 and TP2: the same per-example
loglikelihoods, the same greedy generations, the same scores."""
import json

import pytest

from tests.eval.eval_helpers import run_eval

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

LIMIT = 24


def _records(out, label, task):
    path = out / f"{label}.samples" / f"{task}.jsonl"
    return {r["doc_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _evaluate(material, name, *args, nproc=1, source="checkpoint"):
    out = material["tmp"] / name
    target = ["--checkpoint", material["ckpt"]] if source == "checkpoint" else ["--hf", material["export"]]
    proc = run_eval(*target, "--data-dir", material["data"], "--output", out, "--log-samples", "--no-progress",
                    "--batch-size", 5, *args, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    label = "ckpt-iter0000000" if source == "checkpoint" else "export"
    return {"out": out, "label": label, "report": json.loads((out / f"{label}.json").read_text()),
            "markdown": (out / f"{label}.md").read_text(), "stdout": proc.stdout}


# one multiple-choice (loglikelihood) and one generation task, both real lm_eval tasks on staged data
TASKS = ("--tasks", "arc_challenge:2,gsm8k:2", "--limit", LIMIT, "--gen-kwargs", "max_gen_toks=24")


@pytest.fixture(scope="module")
def tp1(material):
    return _evaluate(material, "tp1", *TASKS)


@pytest.fixture(scope="module")
def hf(material):
    return _evaluate(material, "hf", *TASKS, source="hf")


def _loglikelihoods(run):
    """{(doc, choice): (loglikelihood, is_greedy)} from lm_eval's per-document records."""
    out = {}
    for doc_id, record in _records(run["out"], run["label"], "arc_challenge").items():
        for choice, resp in enumerate(record["resps"]):
            logprob, greedy = resp[0]
            out[(doc_id, choice)] = (float(logprob), bool(greedy))
    return out


def _generations(run):
    return {doc_id: r["resps"][0][0] for doc_id, r in _records(run["out"], run["label"], "gsm8k").items()}


def _row(run, task):
    return next(r for r in run["report"]["tasks"] if r["task"] == task)


def test_loglikelihoods_equal_lm_eval_on_hf_export(tp1, hf):
    ours, theirs = _loglikelihoods(tp1), _loglikelihoods(hf)
    assert set(ours) == set(theirs) and len(ours) == 4 * LIMIT
    for key, (logprob, greedy) in theirs.items():
        assert ours[key][0] == pytest.approx(logprob, abs=1e-4), key
        assert ours[key][1] == greedy, key
    # the choices of a question differ by whole nats: scoring the wrong positions could not pass
    spread = [max(ours[(d, c)][0] for c in range(4)) - min(ours[(d, c)][0] for c in range(4)) for d in range(LIMIT)]
    assert sorted(spread)[LIMIT // 2] > 1.0
    a, b = _row(tp1, "arc_challenge"), _row(hf, "arc_challenge")
    assert (a["metric"], a["samples"]) == (b["metric"], b["samples"]) == ("acc_norm", LIMIT)
    assert a["value"] == b["value"]


def test_gsm8k_generations_equal_transformers(tp1, hf):
    """The real gsm8k task (its prompt format, stop strings, strict-match exact match) end to end:
    megafox's greedy generations (KV-cached) equal transformers' through lm_eval's hf model."""
    ours, theirs = _generations(tp1), _generations(hf)
    assert sorted(ours) == sorted(theirs) == list(range(LIMIT))
    assert ours == theirs
    assert sum(bool(text.strip()) for text in ours.values()) > LIMIT // 2
    row = _row(tp1, "gsm8k")
    assert (row["metric"], row["filter"], row["samples"], row["shots"]) == ("exact_match", "strict-match", LIMIT, 2)
    assert row["value"] == _row(hf, "gsm8k")["value"]
    targets = _records(tp1["out"], tp1["label"], "gsm8k")
    assert all("#### " in r["target"] for r in targets.values())


def test_results_json_and_markdown(tp1):
    report = tp1["report"]
    assert report["lm_eval_version"] == "0.4.13"
    assert report["model"]["kind"] == "checkpoint" and report["model"]["iteration"] == 0
    assert report["model"]["tokenizer"].endswith("tokenizer.model")
    row = _row(tp1, "arc_challenge")
    assert (row["task"], row["shots"], row["metric"], row["filter"], row["samples"]) == \
        ("arc_challenge", 2, "acc_norm", "none", LIMIT)
    assert 0 <= row["value"] <= 1 and row["stderr"] > 0
    settings = report["settings"]
    assert settings["layout"] == "TP1 PP1 DP1 (1 process)" and settings["limit"] == LIMIT and settings["finished"]
    # lm_eval's own record of the prompt protocol is kept
    assert report["lm_eval"]["arc_challenge"]["n-shot"]["arc_challenge"] == 2
    md = tp1["markdown"]
    assert f"| ARC-Challenge | 2 | acc_norm | {100 * row['value']:.2f} | {100 * row['stderr']:.2f} |" in md
    assert "| GSM8K | 2 | exact_match (strict-match) |" in md
    assert "not comparable" in md  # --limit, --gen-kwargs


@pytest.mark.parametrize("name,nproc,layout,expected", [
    # generation without a KV cache (pipeline), vocab-parallel log-softmax / argmax, pipeline schedule
    ("tp2pp2", 4, ("--tp", 2, "--pp", 2), "TP2 PP2 DP1 (4 processes)"),
    # requests split over replicas, each with its own KV cache
    ("dp2", 2, (), "TP1 PP1 DP2 (2 processes)"),
    # KV-cached generation with TP-sharded attention and gathered logits
    ("tp2", 2, ("--tp", 2), "TP2 PP1 DP1 (2 processes)"),
])
def test_other_layouts_score_like_tp1(material, tp1, name, nproc, layout, expected):
    run = _evaluate(material, name, *TASKS, *layout, nproc=nproc)
    ref, got = _loglikelihoods(tp1), _loglikelihoods(run)
    assert set(got) == set(ref)
    for key, (logprob, greedy) in ref.items():
        assert got[key][0] == pytest.approx(logprob, abs=1e-5), key
        assert got[key][1] == greedy, key
    assert _generations(run) == _generations(tp1)
    assert run["report"]["settings"]["layout"] == expected
    for task in ("arc_challenge", "gsm8k"):
        assert _row(run, task)["value"] == _row(tp1, task)["value"]
