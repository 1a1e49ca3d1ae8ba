"""Experiment trackers beside the log line and metrics/<stage>.jsonl: TensorBoard, Weights & Biases,
MLflow (`logging.trackers`). Global rank 0 writes them all.

One tracker run per training run: the W&B run id and the MLflow run id live in the run's records
(<checkpoint.dir>/trackers.json, megafox.records.TrackerRuns), so every stage and every requeue of
the same checkpoint directory continues the same run. The effective config is the run's parameters.

W&B and MLflow get a step's values at the next logging interval, in one batch (MLflow's is
asynchronous), so the step itself never waits on a tracker; TensorBoard's writer is already
asynchronous. wandb and mlflow are optional (`pip install -e '.[trackers]'`).
"""
from __future__ import annotations

import importlib.util
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from megafox.config import ConfigError, TrainConfig
from megafox.records import TrackerRuns, config_mapping, flatten, read_tracker_runs, write_tracker_runs

# jsonl key -> tracker name (keys not listed keep their name, e.g. eval/<task>/<metric>)
NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "skipped": "train/skipped",
         "skipped_steps": "train/skipped_steps", "tokens_per_s": "perf/tokens_per_s", "tflops": "perf/tflops",
         "mfu": "perf/mfu", "mem_gib": "perf/mem_gib", "stage_progress": "progress/stage",
         "eta_stage_s": "progress/eta_stage_s", "eta_run_s": "progress/eta_run_s",
         "straggler_ratio": "straggler/ratio", "straggler_rank": "straggler/rank",
         "straggler_data_share": "straggler/data_share", "valid_loss": "valid/loss"}
# bookkeeping in a jsonl record that is not a metric of its own
NOT_TRACKED = {"iteration", "stage", "consumed_tokens", "batch_tokens", "loss_tokens", "stage_tokens"}
_PIP = "pip install -e '.[trackers]'"


def tracker_name(key: str) -> str:
    if key.startswith("time_mean/"):  # the interval's mean phase times: time/<phase>
        return "time/" + key[len("time_mean/"):]
    return NAMES.get(key, key)


def tracker_values(record: Dict[str, Any]) -> Dict[str, float]:
    """A metrics/<stage>.jsonl record as the trackers receive it: its numbers, by tracker name."""
    out = {}
    for key, value in record.items():
        if key in NOT_TRACKED or not isinstance(value, (int, float)):
            continue
        out[tracker_name(key)] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, values: Dict[str, float], iteration: int, tokens: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, tokens)  # x axis: tokens, comparable across stages

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, config: TrainConfig, runs: TrackerRuns):
        import wandb

        log = config.logging
        resumed = runs.wandb_id is not None
        if not resumed:
            runs.wandb_id = uuid.uuid4().hex[:12]
        self.run = wandb.init(project=log.wandb_project or "megafox", name=log.wandb_run_name, id=runs.wandb_id,
                              resume="allow", dir=log.wandb_dir or config.checkpoint.dir,
                              config=config_mapping(config), allow_val_change=True)
        self.run.define_metric("tokens")
        self.run.define_metric("*", step_metric="tokens")
        self.pending: List[Dict[str, float]] = []
        self.resumed = resumed

    def log(self, values: Dict[str, float], iteration: int, tokens: int) -> None:
        self.pending.append(dict(values, iteration=iteration, tokens=tokens))

    def flush(self) -> None:
        for row in self.pending:
            self.run.log(row)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.run.finish()


class MlflowTracker:
    def __init__(self, config: TrainConfig, runs: TrackerRuns):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        log = config.logging
        uri = log.mlflow_tracking_uri or (Path(config.checkpoint.dir).resolve() / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow >= 3 asks for this opt-in before it writes a plain file store, the default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        params = {k: _param(v) for k, v in flatten(config_mapping(config)).items()}
        existing: Dict[str, str] = {}
        if runs.mlflow_run_id and runs.mlflow_tracking_uri == uri:
            self.run_id = runs.mlflow_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            existing = self.client.get_run(self.run_id).data.params
        else:
            name = log.mlflow_experiment or log.wandb_project or "megafox"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=log.wandb_run_name or Path(config.checkpoint.dir).name)
            self.run_id = run.info.run_id
            runs.mlflow_run_id, runs.mlflow_tracking_uri = self.run_id, uri
        # MLflow parameters are write-once: a resume adds new keys; a changed value is reported
        # (the trainer's resume already checked which changes are allowed)
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            print(f"mlflow: run {self.run_id} keeps its first value of changed config key(s) {', '.join(changed)}",
                  flush=True)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        self.pending: List = []
        self.operations: List = []

    def log(self, values: Dict[str, float], iteration: int, tokens: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(name, value, now, iteration) for name, value in values.items())

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's limit per batch
            self.operations.append(self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000],
                                                         synchronous=False))
        self.pending = []
        while len(self.operations) > 64:  # long done by now (waiting costs nothing); keeps the list short
            self.operations.pop(0).wait()

    def close(self) -> None:
        self.flush()
        for operation in self.operations:
            operation.wait()
        self.client.set_terminated(self.run_id)


def _param(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit for a parameter value


def check_available(trackers: List[str]) -> None:
    """Before anything starts: a named tracker whose package is missing is a config error."""
    for name in trackers:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.trackers: {name} is not installed ({_PIP})")


def open_trackers(config: TrainConfig) -> Tuple[list, Optional[TrackerRuns]]:
    """The trackers of a run, on global rank 0; their run ids are recorded for the next start."""
    log, root = config.logging, Path(config.checkpoint.dir)
    names = log.active_trackers()
    if log.trackers is None and "wandb" in names and importlib.util.find_spec("wandb") is None:
        print("logging.wandb_project is set but wandb is not installed: W&B logging off", flush=True)
        names.remove("wandb")
    trackers: list = []
    runs = read_tracker_runs(root)
    if log.trackers is None and "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        print("tensorboard is not installed: no TensorBoard scalars", flush=True)
        names.remove("tensorboard")
    starts = {"tensorboard": lambda: TensorBoardTracker(log.tensorboard_dir or str(root / "tensorboard")),
              "wandb": lambda: WandbTracker(config, runs), "mlflow": lambda: MlflowTracker(config, runs)}
    for name in names:
        try:
            trackers.append(starts[name]())
        except Exception as exc:  # noqa: BLE001  (whatever the tracker's library raises)
            for started in trackers:
                started.close()
            hint = " (without network: WANDB_MODE=offline)" if name == "wandb" else ""
            raise ConfigError(f"logging.trackers: {name} could not start: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}{hint}") from None
    if "wandb" in names or "mlflow" in names:
        write_tracker_runs(root, runs)
    return trackers, runs
