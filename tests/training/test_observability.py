"""Observability through the real trainer (launch/local.sh -> torchrun -> megafox-train, 2 CPU
ranks): W&B (offline) and MLflow (file store) read back through their own formats/APIs against
metrics/<stage>.jsonl, one tracker run over a requeue and the next stage, per-phase timers, the
on-demand profiler trace, ETA against its closed form, straggler detection with one rank slowed
from the tests' side (tests.support.faults), and `megafox report` from the metrics files alone.

One run is shared by every assertion: stage1 with rank 1 slowed, requeued by SIGUSR1 after step 5;
stage1 resumed to its end; stage2."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from megafox.records import read_tracker_runs
from tests.support.processes import REPO
from tests.training.harness import faulty_trainer, metrics, run_stage

pytestmark = pytest.mark.slow

import wandb  # noqa: E402,F401  (the `trackers` extra: `make test` installs it; missing, this module fails)
import mlflow  # noqa: E402,F401

STAGE_BUDGET = {"stage1": 4096, "stage2": 4096, "stage3": 16384}  # harness.SMALL; stage3 as tiny.yaml
OVERRIDES = ["logging.trackers=[tensorboard,wandb,mlflow]", "logging.interval=2", "profile.steps=[2,3]",
             "profile.ranks=[0]", "validation.interval=4", "logging.wandb_project=obs-test"]
SLOW = ["--slow-rank", "1", "--slow-seconds", "0.25"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("observed") / "run"
    home = root.parent / "home"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(home / "wandb_config"),
           "WANDB_CACHE_DIR": str(home / "wandb_cache"), "WANDB_DATA_DIR": str(home / "wandb_data")}
    outputs, ids = [], []
    for stage, faults in (("stage1", [*SLOW, "--signal-at-step", "5"]), ("stage1", []), ("stage2", [])):
        code, out = run_stage(stage, root, tiny_data, overrides=OVERRIDES,
                              env={**env, **(faulty_trainer(*faults) if faults else {})})
        outputs.append(out)
        assert code == (75 if len(outputs) == 1 else 0), out[-4000:]
        ids.append(read_tracker_runs(root))
    return {"root": root, "outputs": outputs, "ids": ids}


def jsonl(root: Path, stage: str):
    return [json.loads(line) for line in (root / "metrics" / f"{stage}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ W&B's own record format
def wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-log framing (7-byte header ':W&B' + magic +
    version; 32 KiB blocks of [crc32c u32, length u16, type u8] chunks, FULL/FIRST/MIDDLE/LAST) around
    wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        else:  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(root: Path):
    runs = sorted((root / "wandb").glob("offline-run-*"))
    rows, run_ids, config = [], set(), {}
    for run_dir in runs:
        for path in run_dir.glob("run-*.wandb"):
            for record in wandb_records(path):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    run_ids.add(record.run.run_id)
                    config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
                elif kind == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
                elif kind == "config":
                    for item in record.config.update:
                        config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return runs, run_ids, rows, config


def last_by_iteration(rows, key):
    """{iteration: value}; a step re-run after a resume replaces the earlier one, as in harness.metrics."""
    return {int(r["iteration"]): r[key] for r in rows if key in r and "iteration" in r}


def test_wandb_offline_run_holds_the_metrics_and_continues_across_requeue_and_stage(run):
    root, ids = run["root"], run["ids"]
    assert ids[0].wandb_id and ids[0] == ids[1] == ids[2]  # one tracker run for the whole training run
    runs, run_ids, rows, config = wandb_history(root)
    assert len(runs) == 3 and run_ids == {ids[0].wandb_id}  # one offline dir per start, all the same run
    expected = {**metrics(root, "stage1"), **metrics(root, "stage2")}
    assert sorted(last_by_iteration(rows, "train/loss")) == list(range(1, 13))
    for key, name in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        got = last_by_iteration(rows, name)
        assert got == pytest.approx({it: rec[key] for it, rec in expected.items()}, rel=1e-12), key
    interval = {it: rec for it, rec in expected.items() if "tokens_per_s" in rec}
    for key, name in (("tokens_per_s", "perf/tokens_per_s"), ("time_mean/forward_backward", "time/forward_backward"),
                      ("eta_run_s", "progress/eta_run_s")):
        got = last_by_iteration(rows, name)
        assert got == pytest.approx({it: rec[key] for it, rec in interval.items()}, rel=1e-12), key
    valid = [r for s in ("stage1", "stage2") for r in jsonl(root, s) if "valid_loss" in r]
    assert valid and [r["valid/loss"] for r in rows if "valid/loss" in r][-len(valid):] == \
        pytest.approx([r["valid_loss"] for r in valid][-len(valid):], rel=1e-12)
    assert config["optimizer"]["lr"] == pytest.approx(3.0e-3)  # the effective config
    assert config["stages"][1]["token_budget"] == STAGE_BUDGET["stage2"]


def test_mlflow_store_holds_the_metrics_and_one_run(run):
    from mlflow.tracking import MlflowClient

    root, ids = run["root"], run["ids"]
    assert ids[0].mlflow_run_id and ids[0] == ids[2]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=ids[0].mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("obs-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ids[0].mlflow_run_id]
    run_id = ids[0].mlflow_run_id
    expected = {**metrics(root, "stage1"), **metrics(root, "stage2")}

    def history(name):
        out = {}
        for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.timestamp):
            out[m.step] = m.value
        return out
    for key, name in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        assert history(name) == pytest.approx({it: rec[key] for it, rec in expected.items()}, rel=1e-12), key
    for key, name in (("mfu", "perf/mfu"), ("time_mean/step", "time/step"), ("straggler_ratio", "straggler/ratio")):
        assert history(name) == pytest.approx({it: r[key] for it, r in expected.items() if key in r}, rel=1e-12), key
    assert len(history("time/step")) == 6  # one point per logging interval
    params = client.get_run(run_id).data.params
    assert float(params["optimizer.lr"]) == pytest.approx(3.0e-3) and params["stages"] == str(["stage1", "stage2", "stage3"])
    assert client.get_run(run_id).info.status == "FINISHED"


def test_phase_timers_sum_within_the_step(run):
    recs = list(metrics(run["root"], "stage1").values()) + list(metrics(run["root"], "stage2").values())
    for rec in recs:
        phases = {k: v for k, v in rec.items() if k.startswith("time/") and k != "time/step"}
        assert {"time/data", "time/forward_backward", "time/grad_reduce", "time/optimizer"} <= set(phases), rec
        assert all(v >= 0 for v in phases.values()) and rec["time/forward_backward"] > 0
        assert sum(phases.values()) <= rec["time/step"] * 1.001 + 1e-4, rec
    # the interval's means (the log line's and the trackers' numbers) from the steps' own times:
    # stage2's launch logs at 10 and 12, each the mean of the two steps before
    stage2 = metrics(run["root"], "stage2")
    for end in (10, 12):
        for phase in ("step", "forward_backward", "grad_reduce", "data"):
            mean = sum(stage2[it].get(f"time/{phase}", 0.0) for it in (end - 1, end)) / 2
            assert stage2[end][f"time_mean/{phase}"] == pytest.approx(mean, rel=1e-9)
    # checkpoints every 4 steps and validation every 4: their time shows in the step after them
    assert any(r.get("time/checkpoint", 0) > 0 for r in recs) and any(r.get("time/validation", 0) > 0 for r in recs)
    assert " step_s=" in run["outputs"][1] and "fwd_bwd=" in run["outputs"][1]


def test_eta_matches_the_closed_form(run):
    for stage, before in (("stage1", 0), ("stage2", STAGE_BUDGET["stage1"])):
        later = sum(b for s, b in STAGE_BUDGET.items() if s > stage)
        recs = [r for r in metrics(run["root"], stage).values() if "tokens_per_s" in r]
        assert recs
        for rec in recs:
            done = rec["consumed_tokens"] - before
            assert rec["stage_progress"] == pytest.approx(done / STAGE_BUDGET[stage])
            assert rec["eta_stage_s"] == pytest.approx((STAGE_BUDGET[stage] - done) / rec["tokens_per_s"])
            assert rec["eta_run_s"] == pytest.approx((STAGE_BUDGET[stage] - done + later) / rec["tokens_per_s"])
            assert rec["skipped_steps"] == 0
    assert "eta_stage=" in run["outputs"][2] and "eta_run=" in run["outputs"][2]


def test_profiler_trace_covers_exactly_the_requested_steps(run):
    traces = sorted((run["root"] / "profile").glob("*.json"))
    assert [t.name for t in traces] == ["rank0.steps2-3.pt.trace.json"]  # profile.ranks=[0] only
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert {"megafox/data", "megafox/forward_backward", "megafox/grad_reduce", "megafox/optimizer"} <= names
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    inner = [e for e in events if e.get("name") == "megafox/forward_backward"]
    assert len(inner) == 2 and all(any(s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"]
                                       for s in steps) for e in inner)


def test_straggler_is_named_when_one_rank_is_slowed(run):
    slowed = [r for r in jsonl(run["root"], "stage1")[:5] if "straggler_ratio" in r]  # the first start's
    assert slowed and all(r["straggler_rank"] == 1 and r["straggler_ratio"] >= 1.2 for r in slowed), slowed
    assert all(r["straggler_host"] == socket.gethostname() for r in slowed)
    assert f"straggler=rank1@{socket.gethostname()}" in run["outputs"][0]


def test_report_plots_and_summarizes_from_the_metrics_alone(run, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "megafox.cli", "report", str(run["root"]), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "lr.png", "throughput.png", "grad_norm.png", "timers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (out / "summary.md").read_text()
    recs = metrics(run["root"], "stage2")
    assert "| stage2 | 4 |" in summary and f"{recs[max(recs)]['loss']:.4f}" in summary
    empty = subprocess.run([sys.executable, "-m", "megafox.cli", "report", str(tmp_path / "nothing")],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and empty.stderr.count("\n") == 1 and "no metrics" in empty.stderr
