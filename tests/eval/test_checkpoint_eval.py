"""`megafox eval --checkpoint` (in-process, megafox's own model) against lm_eval's `hf` model on the
checkpoint's HF export, and against itself at TP2 x PP2 and DP2: the same per-example
loglikelihoods, the same greedy generations, the same scores."""
import json

import pytest

from eval_helpers import run_eval

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


ARC = ("--tasks", "arc_challenge:2", "--limit", LIMIT)


@pytest.fixture(scope="module")
def arc_tp1(material):
    return _evaluate(material, "arc_tp1", *ARC)


@pytest.fixture(scope="module")
def arc_hf(material):
    return _evaluate(material, "arc_hf", *ARC, source="hf")


def _loglikelihoods(run):
    """{(doc, choice): (loglikelihood, is_greedy)} from lm_eval's per-document records."""
    out = {}
    for doc_id, record in _records(run["out"], run["label"], "arc_challenge").items():
        for choice, resp in enumerate(record["resps"]):
            logprob, greedy = resp[0]
            out[(doc_id, choice)] = (float(logprob), bool(greedy))
    return out


def test_loglikelihoods_equal_lm_eval_on_hf_export(arc_tp1, arc_hf):
    ours, theirs = _loglikelihoods(arc_tp1), _loglikelihoods(arc_hf)
    assert set(ours) == set(theirs) and len(ours) == 4 * LIMIT
    for key, (logprob, greedy) in theirs.items():
        assert ours[key][0] == pytest.approx(logprob, abs=1e-4), key
        assert ours[key][1] == greedy, key
    # the choices of a question differ by whole nats: scoring the wrong positions could not pass
    spread = [max(ours[(d, c)][0] for c in range(4)) - min(ours[(d, c)][0] for c in range(4)) for d in range(LIMIT)]
    assert sorted(spread)[LIMIT // 2] > 1.0
    a, b = arc_tp1["report"]["tasks"][0], arc_hf["report"]["tasks"][0]
    assert (a["metric"], a["value"], a["samples"]) == (b["metric"], b["value"], b["samples"]) == ("acc_norm", a["value"], LIMIT)


def test_results_json_and_markdown(arc_tp1, material):
    report = arc_tp1["report"]
    assert report["lm_eval_version"] == "0.4.13"
    assert report["model"]["kind"] == "checkpoint" and report["model"]["iteration"] == 0
    assert report["model"]["tokenizer"].endswith("tokenizer.model")
    row = report["tasks"][0]
    assert (row["task"], row["shots"], row["metric"], row["filter"], row["samples"]) == \
        ("arc_challenge", 2, "acc_norm", "none", LIMIT)
    assert 0 <= row["value"] <= 1 and row["stderr"] > 0
    assert report["settings"]["layout"] == "TP1 PP1 DP1 (1 process)" and report["settings"]["limit"] == LIMIT
    # lm_eval's own record of the prompt protocol is kept
    assert report["lm_eval"]["arc_challenge"]["n-shot"]["arc_challenge"] == 2
    md = arc_tp1["markdown"]
    assert f"| ARC-Challenge | 2 | acc_norm | {100 * row['value']:.2f} | {100 * row['stderr']:.2f} |" in md
    assert "not comparable" in md  # --limit


@pytest.mark.parametrize("name,nproc,layout", [("tp2pp2", 4, ("--tp", 2, "--pp", 2)), ("dp2", 2, ())])
def test_other_layouts_score_like_tp1(material, arc_tp1, name, nproc, layout):
    run = _evaluate(material, f"arc_{name}", *ARC, *layout, nproc=nproc)
    ref, got = _loglikelihoods(arc_tp1), _loglikelihoods(run)
    assert set(got) == set(ref)
    for key, (logprob, greedy) in ref.items():
        assert got[key][0] == pytest.approx(logprob, abs=1e-5), key
        assert got[key][1] == greedy, key
    expected = "TP2 PP2 DP1 (4 processes)" if name == "tp2pp2" else "TP1 PP1 DP2 (2 processes)"
    assert run["report"]["settings"]["layout"] == expected
    assert run["report"]["tasks"][0]["value"] == arc_tp1["report"]["tasks"][0]["value"]


def test_gsm8k_generation_end_to_end(material):
    """The real gsm8k task (5-shot prompt format, strict-match exact match) on the staged data:
    megafox's greedy generations equal transformers' (through lm_eval's hf model) token for token."""
    args = ("--tasks", "gsm8k:2", "--limit", 4, "--gen-kwargs", "max_gen_toks=24")
    ours, theirs = _evaluate(material, "gsm_ckpt", *args), _evaluate(material, "gsm_hf", *args, source="hf")
    a, b = _records(ours["out"], ours["label"], "gsm8k"), _records(theirs["out"], theirs["label"], "gsm8k")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for doc_id in a:
        assert a[doc_id]["resps"] == b[doc_id]["resps"], doc_id
        assert a[doc_id]["resps"][0][0].strip(), "empty generation"
        assert "#### " in a[doc_id]["target"]
    row = ours["report"]["tasks"][0]
    assert (row["task"], row["metric"], row["filter"], row["samples"]) == ("gsm8k", "exact_match", "strict-match", 4)
    assert row["value"] == theirs["report"]["tasks"][0]["value"]
    assert ours["report"]["settings"]["gen_kwargs"] == "max_gen_toks=24"
