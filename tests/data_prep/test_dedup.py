"""Exact / near-duplicate removal and benchmark decontamination in the data plan (data_prep/dedup.py),
on real text with planted copies and leaked questions from the eval suite's staged test data.

References: exact Jaccard of plain-Python word 5-gram sets, plain-Python 13-gram set overlap with
the staged parquet rows, and `data_prep.preprocess` run on inputs from which the expected documents
were removed by hand (the stage's output must be those bytes)."""
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.data_prep.dedup_helpers import (build_corpus, example_grams, benchmark_questions, dropped, grams, jaccard,
                                           key, plan_yaml, stage_eval_data)
from tests.data_prep.dp_helpers import pp, same_files
from tests.support.processes import REPO, clean_env, python_command, run_command, run_module
from tests.support.text import license_texts, paragraphs


def plan(p, *extra, check=True):
    return run_module("data_prep.plan", "--plan", p, *extra, check=check, timeout=300)


def _outputs(out_dir):
    return {f: (out_dir / "stage1" / f).read_bytes()
            for f in ("web.bin", "web.idx", "books.bin", "books.idx", "web.dropped.jsonl", "books.dropped.jsonl")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dedup")
    data = stage_eval_data(root)
    corpus = build_corpus(root, data)
    p = plan_yaml(root, corpus, tokenizer, data)
    r = plan(p)
    return {"root": root, "data": data, "corpus": corpus, "plan": p, "out": root / "out", "stdout": r.stdout,
            "tokenizer": tokenizer}


# ---------------------------------------------------------------------------------------
# Unit: the fingerprints against their definitions


def test_minhash_estimates_exact_jaccard():
    from data_prep.minhash import MinHasher, shingles

    texts = [p for p in paragraphs(license_texts(["GPL-3", "Apache-2.0"]), loose=True) if len(p.split()) > 60][:6]
    rng = random.Random(0)
    pairs = []
    for t in texts:  # each paragraph against versions with more and more words replaced
        w = t.split()
        for frac in (0.02, 0.1, 0.3):
            v = list(w)
            for i in rng.sample(range(len(v)), max(1, int(frac * len(v)))):
                v[i] = f"zz{i}"
            pairs.append((t, " ".join(v)))
    pairs += list(zip(texts, texts[1:]))  # unrelated paragraphs
    h = MinHasher(256)
    errs = []
    for a, b in pairs:
        est = float(np.mean(h.signature(shingles(a, 5)) == h.signature(shingles(b, 5))))
        errs.append(abs(est - jaccard(grams(a, 5), grams(b, 5))))
    assert max(errs) < 0.12 and np.mean(errs) < 0.04, errs  # std of the estimate: <= 0.5/sqrt(256) = 0.031


def test_lsh_bands_follow_the_s_curve_and_components_match_union_find():
    from data_prep.dedup import components
    from data_prep.minhash import lsh_params

    b, r = lsh_params(0.8, 128, 0.3, 0.7)
    assert b * r <= 128
    caught = lambda j: 1 - (1 - j ** r) ** b  # noqa: E731
    assert caught(0.5) < 0.02 and caught(0.9) > 0.95 and caught(0.95) > 0.999
    rng = np.random.default_rng(0)
    edges = rng.integers(0, 400, size=(2, 300)).astype(np.uint64) * np.uint64(1 << 33)
    nodes, roots = components(edges)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for u, v in edges.T.tolist():
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    assert {int(n): int(r) for n, r in zip(nodes, roots)} == {n: find(n) for n in map(int, nodes)}


# ---------------------------------------------------------------------------------------
# The plan, end to end


@pytest.mark.slow
def test_planted_cases_caught_and_nothing_else(world, tmp_path):
    out, corpus = world["out"], world["corpus"]
    got = {key(r): r for s in ("web", "books") for r in dropped(out, "stage1", s)}
    expect = {(f, line): (kind, orig) for _, f, line, kind, orig in corpus["planted"]}
    assert set(got) == set(expect)
    docs_by_place = {}
    for name, files in corpus["files"].items():
        for f in files:
            for line, x in enumerate(open(f), 1):
                docs_by_place[(f, line)] = json.loads(x)["text"]
    for place, (kind, orig) in expect.items():
        rec = got[place]
        if kind == "contaminated":
            assert rec["reason"] == "contaminated" and orig in {b["task"] for b in rec["benchmarks"]}
            continue
        assert rec["reason"] == kind + "_duplicate"
        assert (rec["duplicate_of"]["file"], rec["duplicate_of"]["line"]) == orig[1:]  # the first copy is kept
        if kind == "near":
            assert jaccard(grams(docs_by_place[place], 5), grams(docs_by_place[orig[1:]], 5)) >= 0.9

    # the leaked questions, per the plain 13-gram reference, are exactly the contaminated documents
    ref = example_grams(benchmark_questions(world["data"]))
    hit = {p: sorted(t for t, g in ref.items() if grams(d, 13) & g) for p, d in docs_by_place.items()}
    assert {p for p, t in hit.items() if t} == {p for p, (k, _) in expect.items() if k == "contaminated"}
    report = json.loads((out / "stage1" / "dedup_report.json").read_text())
    for task in ("arc_challenge", "gsm8k"):
        assert report["benchmarks"][task]["documents"] == sum(task in t for t in hit.values())

    # the output is exactly the tokenization of the kept documents
    for name, files in corpus["files"].items():
        kept = tmp_path / f"{name}.jsonl"
        with open(kept, "w") as f:
            for fpath in files:
                for line, x in enumerate(open(fpath), 1):
                    if (fpath, line) not in got:
                        f.write(x)
        pp([kept], world["tokenizer"], tmp_path / name, "--workers", "1")
        assert same_files(tmp_path / name, out / "stage1" / name)
        man = json.loads((out / "stage1" / f"{name}.manifest.json").read_text())
        removed = sum(1 for p in got if p[0] in files)
        assert sum(man["removed"].values()) == removed
        assert report["sources"][name]["documents_read"] == man["documents"] + removed
        blend = json.loads((out / "stage1" / "blend.json").read_text())
        entry = next(d for d in blend["datasets"] if d["prefix"] == name)
        assert entry["removed"] == man["removed"]
    assert "near duplicates" in world["stdout"]
    info = run_module("megafox.cli", "info", "--blend", out / "stage1" / "blend.json", check=True).stdout
    books = json.loads((out / "stage1" / "books.manifest.json").read_text())["removed"]
    assert f"| books | {json.loads((out / 'stage1' / 'books.manifest.json').read_text())['documents']:,} |" in info
    assert f"| {books['exact_duplicate']} | {books['near_duplicate']} | {books['contaminated']} dropped |" in info
    assert "benchmark gsm8k: " in info and "benchmark arc_challenge: " in info


@pytest.mark.slow
def test_one_worker_and_kill_then_rerun_identical(world, tmp_path):
    ref = _outputs(world["out"])
    one = tmp_path / "one"
    plan(world["plan"], "--output-dir", one, "--workers", "1", "--quiet")
    assert _outputs(one) == {k: v.replace(str(world["out"]).encode(), str(one).encode()) if k.endswith(".jsonl") else v
                             for k, v in ref.items()}

    killed = tmp_path / "killed"
    cmd = python_command("-m", "data_prep.plan", "--plan", world["plan"], "--output-dir", killed, "--workers", "2",
                         "--quiet")
    p = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    sig_dir = killed / "stage1" / "dedup" / "sig"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # killed once the first shard's signatures are in
        if sig_dir.is_dir() and any(f.endswith(".json") for d in sig_dir.iterdir() for f in os.listdir(d)):
            break
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL  # killed mid-run, not finished
    r = run_command(cmd)
    assert r.returncode == 0, r.stderr
    assert _outputs(killed) == {k: v.replace(str(world["out"]).encode(), str(killed).encode())
                                if k.endswith(".jsonl") else v for k, v in ref.items()}
    assert not [f for d, _, fs in os.walk(killed) for f in fs if ".tmp" in f]


@pytest.mark.slow
def test_array_steps_with_report_only_keep_contaminated(world, tmp_path):
    """SLURM order: array tasks (signatures) -> --dedup-merge (itself split) -> array tasks
    (tokenize what is kept) -> --finalize; with action: report the leaked questions stay in."""
    p = plan_yaml(tmp_path, world["corpus"], world["tokenizer"], world["data"], action="report")
    for i in range(2):
        plan(p, "--array-index", i, "--array-count", 2, "--quiet")
    r = plan(p, "--finalize", check=False)
    assert r.returncode == 2 and "--dedup-merge" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    plan(p, "--dedup-merge", "--array-index", 0, "--array-count", 2, "--quiet")
    plan(p, "--dedup-merge", "--quiet")
    for i in range(2):
        plan(p, "--array-index", i, "--array-count", 2, "--quiet")
    plan(p, "--finalize", "--quiet")
    out = tmp_path / "out" / "stage1"
    recs = {key(r): r for s in ("web", "books") for r in dropped(tmp_path / "out", "stage1", s)}
    ref = {key(r): r for s in ("web", "books") for r in dropped(world["out"], "stage1", s)}
    assert set(recs) == set(ref)
    for k, r in recs.items():
        assert r["reason"] == ref[k]["reason"].replace("contaminated", "contaminated_reported")
    books = json.loads((out / "books.manifest.json").read_text())
    ref_books = json.loads((world["out"] / "stage1" / "books.manifest.json").read_text())
    assert books["removed"]["contaminated_reported"] == ref_books["removed"]["contaminated"] > 0
    assert books["documents"] == ref_books["documents"] + ref_books["removed"]["contaminated"]


def test_bad_sections_one_line(tmp_path, tokenizer):
    base = (f"tokenizer: {{model: {tokenizer}}}\nstages:\n  s1:\n    token_budget: 10\n"
            f"    sources: [{{name: a, globs: [x.jsonl], weight: 1}}]\n")
    for section, needle in (("    dedup: {threshold: 1.5}\n", "stages.s1.dedup.threshold"),
                            ("    dedup: {bands: 3}\n", "unknown field(s) bands"),
                            ("    decontaminate: {ngram: 13}\n", "name the benchmarks"),
                            ("    decontaminate: {suite: fox1, action: delete}\n", "decontaminate.action")):
        p = tmp_path / "p.yaml"
        p.write_text(base + section)
        r = plan(p, "--validate", check=False)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_across_stages_drops_only_the_later_stage_copies(world, tmp_path):
    corpus = world["corpus"]
    src = lambda name: f"      - {{name: {name}, globs: {json.dumps(corpus['files'][name])}, weight: 1}}\n"  # noqa
    p = tmp_path / "plan.yaml"
    p.write_text(f"output_dir: {tmp_path / 'out'}\ntokenizer: {{model: {world['tokenizer']}}}\n"
                 f"preprocess: {{workers: 2}}\nstages:\n"
                 f"  stage1:\n    token_budget: 1000\n    sources:\n" + src("web") +
                 f"  stage2:\n    token_budget: 1000\n    sources:\n" + src("books") +
                 f"    dedup: {{exact: true, near: false, across_stages: true}}\n")
    plan(p, "--quiet")
    got = {key(r): r for r in dropped(tmp_path / "out", "stage2", "books")}
    exact = {(f, line): orig for s, f, line, kind, orig in corpus["planted"] if kind == "exact"}
    assert set(got) == set(exact)  # books' copies of web documents; its leaked questions stay
    for place, orig in exact.items():
        assert got[place]["duplicate_of"] == {"source": "stage1.web", "file": orig[1], "line": orig[2]}
    assert "removed" not in json.loads((tmp_path / "out" / "stage1" / "web.manifest.json").read_text())
    blend = json.loads((tmp_path / "out" / "stage2" / "blend.json").read_text())
    assert blend["datasets"][0]["removed"]["exact_duplicate"] == len(exact)


@pytest.mark.slow
def test_missing_benchmark_data_one_line(world, tmp_path):
    """`suite: fox1` with only ARC and GSM8K staged: the first missing dataset, named, before any work."""
    p = tmp_path / "plan.yaml"
    p.write_text(world["plan"].read_text().replace("tasks: [arc_challenge, gsm8k]", "suite: fox1")
                 .replace(f"output_dir: {world['root'] / 'out'}", f"output_dir: {tmp_path / 'out'}"))
    r = plan(p, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stages.stage1.decontaminate: task hellaswag" in r.stderr and "Rowan/hellaswag" in r.stderr
    assert not list((tmp_path / "out").rglob("*.bin"))


@pytest.mark.slow
def test_task_yaml_examples_rendered_by_the_task(tmp_path):
    """A task YAML (lm_eval's format, data under the data dir): every test document, as the task
    renders it with its gold answer, is indexed; a document quoting one is found, others are not."""
    from data_prep.decontaminate import BenchmarkIndex, benchmark_examples
    from data_prep.minhash import word_hashes
    from tests.eval.eval_helpers import stage_docstring_task

    yaml_path = stage_docstring_task(tmp_path / "tasks", tmp_path / "data")
    rows = [json.loads(x) for x in (tmp_path / "data" / "docstring_mc" / "test.jsonl").read_text().splitlines()]
    ex = benchmark_examples(None, [str(yaml_path)], str(tmp_path / "data"))
    assert ex == {"docstring_mc": [f"Docstring: {r['docstring']}\nFunction: {r['choices'][r['answer']]}" for r in rows]}
    idx = BenchmarkIndex.build(ex, 8)
    long_rows = [i for i, r in enumerate(rows) if len(r["docstring"].split()) >= 10]
    i = long_rows[0]
    doc = "Some unrelated prose about a library.\n" + rows[i]["docstring"] + "\nAnd more prose after it."
    assert (0, i) in idx.hits(word_hashes(doc))
    assert idx.hits(word_hashes(" ".join(paragraphs(license_texts(["MPL-2.0"]))[:3]))) == []
