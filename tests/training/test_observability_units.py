"""The pieces of observability that need no training run: phase timers against a wall clock,
the config's new keys, the tracker run record, and the trackers' names for the jsonl keys."""
from __future__ import annotations

import importlib.util
import time

import pytest

from megafox import records
from megafox.config import ConfigError, load_train_config
from megafox.training import trackers
from megafox.training.timers import PhaseTimers
from tests.support.processes import REPO

TINY = REPO / "configs" / "train" / "tiny.yaml"


def test_phases_are_exclusive_and_add_up_to_the_wall_clock():
    timers = PhaseTimers()
    start = time.perf_counter()
    with timers.phase("forward_backward"):
        time.sleep(0.02)
        timed = timers.wrap("grad_reduce", time.sleep)
        timed(0.03)
        with timers.phase("grad_reduce"):
            time.sleep(0.01)
    outer = time.perf_counter() - start
    with timers.phase("optimizer"):
        time.sleep(0.01)
    wall = time.perf_counter() - start
    got = timers.take()
    assert set(got) == {"forward_backward", "grad_reduce", "optimizer"}
    # sleep never returns early: the inner 0.04 s are grad_reduce's and not forward_backward's
    assert got["grad_reduce"] >= 0.04 and got["forward_backward"] >= 0.02
    assert got["forward_backward"] + got["grad_reduce"] == pytest.approx(outer, abs=1e-3)
    assert sum(got.values()) <= wall and sum(got.values()) == pytest.approx(wall, abs=1e-3)
    assert timers.take() == {}


def test_defaults_keep_existing_configs_and_bad_values_name_the_field():
    config = load_train_config(TINY)
    assert config.logging.active_trackers() == ["tensorboard"] and config.profile.steps == []
    legacy = load_train_config(TINY, ["logging.wandb_project=p", "logging.tensorboard_dir="])
    assert legacy.logging.active_trackers() == ["wandb"]
    for override, field in (("logging.trackers=[comet]", "logging.trackers[0]"),
                            ("profile.steps=[5,2]", "profile.steps"), ("profile.steps=[0,2]", "profile.steps"),
                            ("profile.ranks=[-1]", "profile.ranks"),
                            ("logging.straggler_threshold=0.9", "logging.straggler_threshold"),
                            ("profile.colour=1", "profile")):
        with pytest.raises(ConfigError, match=rf"{TINY}: {field.replace('[', '.').replace(']', '.')}"):
            load_train_config(TINY, [override])


def test_a_named_tracker_that_is_not_installed_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.trackers: mlflow is not installed \(pip install"):
        trackers.check_available(["tensorboard", "mlflow"])


def test_tracker_run_record_round_trips_and_a_bad_one_names_the_file(tmp_path):
    assert records.read_tracker_runs(tmp_path) == records.TrackerRuns()
    runs = records.TrackerRuns(wandb_id="abc", mlflow_run_id="r1", mlflow_tracking_uri="file:///x")
    records.write_tracker_runs(tmp_path, runs)
    assert records.read_tracker_runs(tmp_path) == runs
    (tmp_path / records.TRACKERS_FILE).write_text('{"wandb_id": "abc", "comet": 1}')
    with pytest.raises(records.RecordError, match=rf"{tmp_path / records.TRACKERS_FILE}.*comet"):
        records.read_tracker_runs(tmp_path)


def test_trackers_get_every_number_of_a_record_under_its_tracker_name():
    record = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "skipped": False, "batch_tokens": 512,
              "consumed_tokens": 1024, "loss_tokens": 500, "time_mean/step": 0.2, "tokens_per_s": 10.0,
              "straggler_host": "node7", "straggler_rank": 3, "eval/hellaswag/acc": 0.3}
    assert trackers.tracker_values(record) == {
        "train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5, "train/skipped": 0.0, "time/step": 0.2,
        "perf/tokens_per_s": 10.0, "straggler/rank": 3.0, "eval/hellaswag/acc": 0.3}


def test_observing_differently_is_no_config_change_on_resume():
    from megafox.records import config_mapping
    from megafox.training import curriculum

    saved = config_mapping(load_train_config(TINY))
    del saved["profile"]  # a checkpoint from before the section existed
    now = config_mapping(load_train_config(TINY, ["profile.steps=[3,4]", "logging.trackers=[wandb]",
                                                  "logging.straggler_threshold=1.5"]))
    assert curriculum.compare_configs(saved, now, ["stage1"]) == curriculum.ConfigChanges()


def test_sigusr2_traces_exactly_the_next_signal_steps_and_leaves_the_handler_as_it_was(tmp_path):
    import json
    import os
    import signal
    from types import SimpleNamespace

    import torch

    from megafox.training.callbacks.profiler import ProfilerCallback

    before = signal.getsignal(signal.SIGUSR2)
    config = load_train_config(TINY, [f"checkpoint.dir={tmp_path}", "profile.signal_steps=2"])
    [callback] = ProfilerCallback.for_rank(config, rank=3)
    trainer = SimpleNamespace(state=SimpleNamespace(iteration=0))
    callback.on_start(trainer)
    for iteration in range(1, 8):
        with torch.profiler.record_function("megafox/forward_backward"):
            torch.ones(8, 8) @ torch.ones(8, 8)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # mid-step: the trace starts with the next step
        trainer.state.iteration = iteration
        callback.post_step(trainer, SimpleNamespace(iteration=iteration))
    callback.close(trainer)
    assert signal.getsignal(signal.SIGUSR2) == before
    [trace] = (tmp_path / "profile").iterdir()
    assert trace.name == "rank3.steps3-4.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"]
    assert sum(e.get("name") == "megafox/forward_backward" for e in events) == 2


def test_no_profiling_configured_adds_no_callback_and_leaves_sigusr2_alone():
    from megafox.training.callbacks.profiler import ProfilerCallback

    no_oom = "profile.memory_snapshot_on_oom=false"  # (on by default, on CUDA only)
    assert ProfilerCallback.for_rank(load_train_config(TINY, [no_oom]), rank=0) == []
    assert ProfilerCallback.for_rank(load_train_config(TINY, [no_oom, "profile.steps=[2,3]"]), rank=1) == []


def test_a_failing_tracker_is_turned_off_and_the_run_goes_on(tmp_path, capsys):
    from megafox.training.callbacks.metrics import Metrics

    class Broken:
        def __init__(self):
            self.logged = 0

        def log(self, values, iteration, tokens):
            self.logged += 1

        def flush(self):
            raise ConnectionError("tracking server unreachable")

        def close(self):
            raise AssertionError("a tracker turned off is not closed")

    config = load_train_config(TINY, [f"checkpoint.dir={tmp_path}", "logging.trackers=[]", "logging.interval=2"])
    metrics = Metrics(config, "stage1", config.model, 64, world_size=1, rank=0)
    broken = Broken()
    metrics.trackers = [broken]
    for iteration in (1, 2, 3, 4):
        metrics.step(iteration, {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "batch_tokens": 512,
                                 "consumed_tokens": 512 * iteration, "skipped": False})
    metrics.close()
    assert broken.logged == 2 and metrics.trackers == []
    assert capsys.readouterr().out.count("Broken: flush failed (ConnectionError: tracking server unreachable)") == 1
    assert len((tmp_path / "metrics" / "stage1.jsonl").read_text().splitlines()) == 4  # the jsonl went on


def test_a_straggler_is_measured_against_its_own_pipeline_stage():
    from megafox.training.callbacks.metrics import slowest_rank

    hosts = ["n0", "n0", "n1", "n1"]
    # [step, data, grad_reduce, pipeline stage]: the last stage is busier by design (the loss)
    balanced = [[1.0, 0.1, 0.0, 0], [1.0, 0.1, 0.0, 0], [2.0, 0.1, 0.0, 1], [2.1, 0.1, 0.0, 1]]
    assert slowest_rank(balanced, hosts, 1.2) == {"straggler_ratio": pytest.approx(2.1 / 2.05)}
    # rank 2 is slow; rank 3 waited for it in the gradient reduction, so its step took as long
    slow = [[1.0, 0.1, 0.0, 0], [1.0, 0.1, 0.0, 0], [3.0, 0.6, 0.0, 1], [3.0, 0.1, 1.0, 1]]
    assert slowest_rank(slow, hosts, 1.2) == {"straggler_ratio": pytest.approx(3.0 / 2.5), "straggler_rank": 2,
                                              "straggler_host": "n1", "straggler_data_share": pytest.approx(0.2)}


def test_a_tracker_that_cannot_start_is_one_config_error_line(tmp_path):
    from megafox.training.callbacks.metrics import Metrics

    # an MLflow store where nothing can be written (not even by root)
    config = load_train_config(TINY, [f"checkpoint.dir={tmp_path}", "logging.trackers=[mlflow]",
                                      "logging.mlflow_tracking_uri=file:///proc/megafox/mlruns"])
    with pytest.raises(ConfigError, match=r"^logging.trackers: mlflow could not start: \w+") as info:
        Metrics(config, "stage1", config.model, 64, world_size=1, rank=0)
    assert "\n" not in str(info.value)
    assert not (tmp_path / records.TRACKERS_FILE).exists()
