"""`python -m megafox.data.build_index`: builds, in one process, exactly the index files the trainer's
StageData then finds (none added, none rewritten); reruns are no-ops; a later stage is built from
the previous stage's documents-read record; bad input exits 2 with one line."""
from __future__ import annotations

import os

import pytest

from megafox.config import load_train_config
from megafox.data.build_index import cache_dir, main, stage_data_from_config
from megafox.data.documents_read import read_documents_read, record_dir, write_documents_read
from tests.support.indexed import write_blend
from tests.support.processes import REPO, clean_env, run_command, run_module

CONFIG = str(REPO / "configs" / "train" / "tiny.yaml")


@pytest.fixture
def run(corpus_data, tok_model, tmp_path):
    data = tmp_path / "data"
    code, prose = corpus_data["code"], corpus_data["prose"]
    write_blend(data / "stage1" / "blend.json", tok_model, [(code, 0.8), (prose, 0.2)], 4096, "stage1")
    write_blend(data / "stage2" / "blend.json", tok_model, [(code, 0.5), (prose, 0.5)], 4096, "stage2")
    overrides = [f"data_dir={data}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "stages.stage1.token_budget=8192", "stages.stage2.token_budget=4096"]
    args = [a for o in overrides for a in ("--override", o)]
    return {"config": load_train_config(CONFIG, overrides), "args": args, "overrides": overrides}


def _listing(path):
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if not e.name.startswith(".")}


def test_builds_what_the_trainer_finds(run, capsys):
    cfg = run["config"]
    assert main(["--config", CONFIG, "--stage", "stage1"] + run["args"]) == 0
    out = capsys.readouterr().out
    # train and valid split: per prefix a GPTDataset (3 indices + description), a BlendedDataset (2 + 1)
    assert "stage stage1: 128 training samples of 64 tokens" in out and "built 22 index files" in out
    built = _listing(cache_dir(cfg))
    assert len(built) == 22 and len([n for n in built if n.endswith(".npy")]) == 16
    # the trainer's StageData for the stage: every file found, none written again
    s1 = stage_data_from_config(cfg, "stage1")
    assert _listing(cache_dir(cfg)) == built
    assert main(["--config", CONFIG, "--stage", "stage1"] + run["args"]) == 0
    assert "already built: every index file was in" in capsys.readouterr().out

    # stage 2 needs stage 1's record
    assert main(["--config", CONFIG, "--stage", "stage2"] + run["args"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --stage stage2: its indices depend on the documents stage stage1 read")
    assert str(record_dir(cfg.checkpoint.dir, "stage1")) in err and "\n" not in err
    write_documents_read(s1, 64, record_dir(cfg.checkpoint.dir, "stage1"))
    assert main(["--config", CONFIG, "--stage", "stage2"] + run["args"]) == 0
    built = _listing(cache_dir(cfg))
    s2 = stage_data_from_config(cfg, "stage2",
                                excluded_documents=read_documents_read(record_dir(cfg.checkpoint.dir, "stage1")))
    assert _listing(cache_dir(cfg)) == built and s2.excluded_documents.stages[0]["stage"] == "stage1"


def test_command_line_and_bad_input(run, tmp_path):
    overrides = " ".join(run["overrides"])
    # the index step of launch/preprocess.slurm, run by hand as SLURM would
    proc = run_command(["bash", REPO / "launch" / "preprocess.slurm"], timeout=300,
                       env=clean_env(MEGAFOX_OVERRIDES=overrides, MEGAFOX_PREP_STEP="index", TRAIN_CONFIG=CONFIG))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage stage1: 128 training samples" in proc.stdout and "built 22 index files" in proc.stdout
    assert os.path.isdir(os.path.join(tmp_path, "ckpt", "data_cache"))  # MEGAFOX_OVERRIDES was read

    def build_index(*args):
        return run_module("megafox.data.build_index", "--config", CONFIG, *args, timeout=300,
                          env=clean_env(MEGAFOX_OVERRIDES=overrides))

    proc = build_index("--stage", "stage1")
    assert proc.returncode == 0 and "already built" in proc.stdout, proc.stderr[-2000:]
    proc = build_index("--stage", "stage9")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--stage: unknown stage 'stage9'" in proc.stderr
    (tmp_path / "data" / "stage1" / "blend.json").write_text("{not json")
    proc = build_index("--stage", "stage1")
    assert proc.returncode == 2 and "stage1/blend.json: not a readable JSON blend" in proc.stderr
