"""Data plan -> per-stage blend.json -> load_blend."""

import json
import os

import pytest

from tests.data_prep.dp_helpers import same_files
from tests.support.indexed import read_indexed
from tests.support.processes import REPO, clean_env, run_command, run_module

TINY = os.path.join(REPO, "configs", "data", "tiny.yaml")


def test_tiny_plan_blend_roundtrip(tmp_path):
    """The plan's blend.json files, read by the trainer's own reader (megafox.data.blend)."""
    import sentencepiece as spm

    from megafox.data.blend import read_blend

    run_module("data_prep.plan", "--plan", TINY, "--output-dir", tmp_path / "data", "--quiet", check=True)
    for stage in ("stage1", "stage2", "stage3"):
        raw = json.loads((tmp_path / "data" / stage / "blend.json").read_text())
        assert raw["stage"] == stage and raw["token_budget"] > 0
        assert all(not os.path.isabs(d["prefix"]) for d in raw["datasets"])
        b = read_blend(tmp_path / "data" / stage / "blend.json")
        assert b.stage == stage and b.token_budget == raw["token_budget"]
        sp = spm.SentencePieceProcessor(model_file=b.tokenizer)
        assert sp.GetPieceSize() == 2000
        for d, r in zip(b.datasets, raw["datasets"]):
            assert os.path.isabs(d.prefix) and d.prefix.startswith(str(tmp_path / "data" / stage))
            docs, _ = read_indexed(d.prefix)
            assert len(docs) == r["documents"] == d.num_documents and sum(map(len, docs)) == r["tokens"]
            assert [len(x) for x in docs] == d.lengths.tolist()
    b1 = read_blend(tmp_path / "data" / "stage1" / "blend.json")
    assert [d.weight for d in b1.datasets] == [0.7, 0.3]
    # rerun: everything up to date, same blend
    run_module("data_prep.plan", "--plan", TINY, "--output-dir", tmp_path / "data", "--quiet", check=True)
    again = read_blend(tmp_path / "data" / "stage1" / "blend.json")
    assert [(d.prefix, d.weight) for d in again.datasets] == [(d.prefix, d.weight) for d in b1.datasets]
    # the blend directory can be moved: prefixes are relative
    os.rename(tmp_path / "data", tmp_path / "moved")
    assert read_blend(tmp_path / "moved" / "stage2" / "blend.json").datasets[0].prefix.startswith(
        str(tmp_path / "moved"))


@pytest.mark.parametrize("mutate, msg", [
    (lambda p: p["stages"]["stage1"]["sources"][0].update(weight="heavy"), "stages.stage1.sources[0].weight"),
    (lambda p: p["stages"]["stage2"].pop("token_budget"), "stages.stage2.token_budget: required"),
    (lambda p: p["tokenizer"].update(model="x.model"), "tokenizer: give exactly one"),
    (lambda p: p["stages"]["stage1"]["sources"][1].update(name="email"), "duplicate source name"),
    (lambda p: p["stages"]["stage3"]["sources"][0].update(globs=["/nonexistent/*.jsonl"]),
     "stages.stage3.sources[0].globs: glob /nonexistent/*.jsonl: matches no file"),
    (lambda p: p["stages"]["stage1"]["sources"][0].update(wieght=1), "unknown field(s) wieght"),
])
def test_plan_errors_name_file_and_field(tmp_path, mutate, msg):
    import yaml

    plan = yaml.safe_load(open(TINY))
    mutate(plan)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    r = run_module("data_prep.plan", "--plan", path, "--output-dir", tmp_path / "d")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(path) in r.stderr and msg in r.stderr, r.stderr


def test_fox1_plan_validates():
    r = run_module("data_prep.plan", "--plan", REPO / "configs" / "data" / "fox1.yaml", "--validate", check=True)
    assert "ok (3 stages" in r.stdout


def test_slurm_steps_match_local_run(tmp_path):
    """launch/preprocess.slurm steps run by hand (as SLURM would) == a local `data_prep.plan` run."""
    import sys

    run_module("data_prep.plan", "--plan", TINY, "--output-dir", tmp_path / "local", "--quiet", check=True)
    env = clean_env(PYTHON=sys.executable, DATA_PLAN=TINY, OUTPUT_DIR=tmp_path / "slurm", STAGES="stage1 stage2",
                    WORKERS="1")
    script = os.path.join(REPO, "launch", "preprocess.slurm")
    steps = [("tokenizer", {})] + [("array", {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "3"})
                                   for i in range(3)] + [("merge", {})]
    for step, extra in steps:
        r = run_command(["bash", script], env=dict(env, MEGAFOX_PREP_STEP=step, **extra), timeout=120)
        assert r.returncode == 0, (step, r.stdout, r.stderr)
    for stage, src in (("stage1", "email"), ("stage1", "json"), ("stage2", "http")):
        assert same_files(tmp_path / "local" / stage / src, tmp_path / "slurm" / stage / src)
    assert not (tmp_path / "slurm" / "stage3").exists()
    a = json.loads((tmp_path / "local" / "stage1" / "blend.json").read_text())
    b = json.loads((tmp_path / "slurm" / "stage1" / "blend.json").read_text())
    assert a["datasets"] == b["datasets"]
