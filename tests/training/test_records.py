"""The records a run leaves on disk (megafox.records): typed, versioned, read and written only
through one module, including megafox-dist-v1 records and the shell's CLI; and the resume policy
that compares a checkpoint's effective config with the one given now (megafox.training.curriculum)."""
import dataclasses
import json
import math

import pytest

from megafox import records
from megafox.config import fox1_tiny, load_train_config
from megafox.training import curriculum
from tests.support.processes import REPO, clean_env, run_module

TINY = REPO / "configs" / "train" / "tiny.yaml"


def _train_record(config, **fields):
    base = dict(iteration=8, kind="train", model=config.model, layout=records.SavedLayout(1, 1, 1, 2, 2),
                tokenizer={"path": "/t/tokenizer.model", "sha256": "ab"}, stage="stage1", stage_index=0,
                stage_end=True, seq_length=64, global_batch_size=32, scheduler={"num_steps": 16384},
                run_state=records.RunState(8, 16384, {"stage1": 256}, 1, 2.5), config=records.config_mapping(config))
    base.update(fields)
    return records.CheckpointRecord(**base)


def test_checkpoint_record_round_trips_with_the_effective_config(tmp_path):
    config = load_train_config(TINY, ["optimizer.lr=1e-3", "stages.stage2.token_budget=4096"])
    record = _train_record(config)
    records.write_checkpoint_record(tmp_path, record)
    back = records.read_checkpoint_record(tmp_path)
    assert back == record and back.path == str(tmp_path)
    assert isinstance(back.run_state, records.RunState) and back.run_state.consumed_samples == {"stage1": 256}
    # the overrides are in the saved config, not only the YAML path
    assert back.config["optimizer"]["lr"] == 1e-3 and back.config["overrides"] == ["optimizer.lr=1e-3",
                                                                                     "stages.stage2.token_budget=4096"]
    assert [s["token_budget"] for s in back.config["stages"]][1] == 4096


def test_megafox_dist_v1_records_are_read_and_upgraded(tmp_path):
    """What megafox wrote before the records module: trainer checkpoints and model-only ones."""
    model = dataclasses.asdict(fox1_tiny())
    train_v1 = {"kind": "megafox-train", "stage": "stage1", "stage_index": 0, "stage_end": False, "seq_length": 64,
                "global_batch_size": 8, "scheduler": {"num_steps": 512}, "model": model, "config": "configs/train/tiny.yaml",
                "run_state": {"iteration": 1, "consumed_tokens": 512, "consumed_samples": {"stage1": 8},
                              "skipped_steps": 0, "last_loss": 7.1},
                "tokenizer": {"path": "/t/tok.model", "sha256": "00"}, "format": "megafox-dist-v1", "iteration": 1,
                "layout": {"tp": 1, "pp": 1, "vpp": 1, "dp": 2, "world": 2}}
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "megafox.json").write_text(json.dumps(train_v1))
    rec = records.read_checkpoint_record(tmp_path / "train")
    assert rec.kind == "train" and rec.config is None and rec.run_state.consumed_samples == {"stage1": 8}
    assert rec.layout == records.SavedLayout(1, 1, 1, 2, 2) and rec.model == fox1_tiny().validate()
    model_only_v1 = {"model": model, "layout": {"tp": 2, "pp": 1, "vpp": 1, "dp": None, "world": None}, "stage": None,
                     "consumed_tokens": 0, "model_only": True, "source": "hf:/x", "tokenizer": "/x/tokenizer.model",
                     "format": "megafox-dist-v1", "iteration": 0}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "megafox.json").write_text(json.dumps(model_only_v1))
    rec = records.read_checkpoint_record(tmp_path / "hf")
    assert rec.kind == "model-only" and rec.layout.tp == 2 and rec.tokenizer == {"path": "/x/tokenizer.model"}
    assert rec.progress == {"consumed_tokens": 0} and rec.source == "hf:/x"


@pytest.mark.parametrize("content,message", [
    ("{not json", "unreadable checkpoint record (JSONDecodeError"),
    ('{"format": "megafox-dist-v9"}', "unknown checkpoint format 'megafox-dist-v9'"),
    ('{"format": "megafox-dist-v2", "kind": "train", "model": {}, "layout": {}}', "field 'iteration' missing"),
    ('{"format": "megafox-dist-v2", "iteration": 3, "kind": "weights", "model": {}, "layout": {}}', "field 'kind'"),
    ('{"format": "megafox-dist-v2", "iteration": 3, "kind": "train", "model": {"preset": 1}, "layout": {}}',
     "model: unknown field(s) preset"),
])
def test_malformed_records_name_the_file_and_field(tmp_path, content, message):
    (tmp_path / "megafox.json").write_text(content)
    with pytest.raises(records.RecordError) as err:
        records.read_checkpoint_record(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "megafox.json")) and message in str(err.value), str(err.value)


def test_stage_done_records(tmp_path):
    assert records.read_stage_done(tmp_path, "stage1") is None
    records.write_stage_done(tmp_path, records.StageDone("stage1", 8, 16384, 256, 2.5, documents="stage1.documents"))
    done = records.read_stage_done(tmp_path, "stage1")
    assert (done.iteration, done.stage_samples, done.documents) == (8, 256, "stage1.documents")
    # a v1 .done (no version) still reads; a malformed one names its file
    (tmp_path / "stage2.done").write_text(json.dumps({"stage": "stage2", "iteration": 9, "consumed_tokens": 1,
                                                      "stage_samples": 4, "loss": float("nan")}))
    assert math.isnan(records.read_stage_done(tmp_path, "stage2").loss)
    (tmp_path / "stage3.done").write_text(json.dumps({"stage": "stage3", "iteration": -1, "consumed_tokens": 1,
                                                      "stage_samples": 4}))
    with pytest.raises(records.RecordError, match="stage3.done: field 'iteration'"):
        records.read_stage_done(tmp_path, "stage3")


def _changes(saved_overrides, current_overrides, trained=("stage1",)):
    saved = records.config_mapping(load_train_config(TINY, saved_overrides))
    current = records.config_mapping(load_train_config(TINY, current_overrides))
    return curriculum.compare_configs(saved, current, list(trained))


def test_resume_policy_refuses_what_makes_the_run_wrong_and_reports_the_rest():
    assert _changes([], []) == curriculum.ConfigChanges()
    # where things are written and how they are logged never matter
    assert _changes([], ["checkpoint.dir=/elsewhere", "logging.interval=1", "data.cache_dir=/c"]) == \
        curriculum.ConfigChanges()
    reported = _changes([], ["optimizer.lr=1e-3", "schedule.warmup_tokens=1024", "stages.stage1.batch_tokens=4096",
                             "parallel.tensor_model_parallel_size=2", "stages.stage2.seq_length=256"])
    assert not reported.refused
    assert sorted(t.split(":")[0] for t in reported.reported) == [
        "optimizer.lr", "parallel.tensor_model_parallel_size", "schedule.warmup_tokens",
        "stages.stage1.batch_tokens", "stages.stage2.seq_length"]
    assert "optimizer.lr: 0.003 -> 0.001" in reported.reported
    for change in (["model.num_layers=2"], ["seed=7"], ["validation.valid_fraction=0.1"],
                   ["stages.stage1.seq_length=128"], ["stages.stage1.token_budget=131072"],
                   ["stages.stage1.data=stage2/blend.json"]):
        got = _changes([], change)
        assert [t.split(":")[0] for t in got.refused] == [change[0].split("=")[0]], (change, got)
    # a later stage's length is free until that stage has trained
    assert not _changes([], ["stages.stage2.seq_length=256"]).refused
    assert _changes([], ["stages.stage2.seq_length=256"], trained=("stage1", "stage2")).refused


def test_records_cli_for_the_launch_scripts(tmp_path):
    env = clean_env(MEGAFOX_OVERRIDES=f"checkpoint.dir={tmp_path / 'run'}")

    def cli(*args):
        return run_module("megafox.records", *args, env=env, timeout=120)

    got = cli("checkpoint-dir", "--config", str(TINY), "--stage", "stage1", "--stage", "stage3")
    assert got.returncode == 0 and got.stdout.strip() == str(tmp_path / "run")
    got = cli("checkpoint-dir", "--config", str(TINY), "--stage", "stage9")
    assert got.returncode == 2 and "unknown stage 'stage9'" in got.stderr and "Traceback" not in got.stderr
    assert cli("stage-done", "--checkpoint-dir", str(tmp_path), "--stage", "stage1").returncode == 1
    records.write_stage_done(tmp_path, records.StageDone("stage1", 8, 16384, 256))
    got = cli("stage-done", "--checkpoint-dir", str(tmp_path), "--stage", "stage1")
    assert got.returncode == 0 and "stage1 complete at iteration 8" in got.stdout
    (tmp_path / "stage2.done").write_text("garbage")
    got = cli("stage-done", "--checkpoint-dir", str(tmp_path), "--stage", "stage2")
    assert got.returncode == 2 and "stage2.done: unreadable" in got.stderr
