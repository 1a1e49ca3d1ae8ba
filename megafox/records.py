"""The records a run leaves on disk, typed and versioned; this module is their only reader and writer.

    <checkpoint.dir>/iter_NNNNNNN/megafox.json   CheckpointRecord: what the checkpoint holds (written last,
                                                 so its presence marks a complete save)
    <checkpoint.dir>/<stage>.done                StageDone: the stage finished at this checkpoint
    <checkpoint.dir>/trackers.json               TrackerRuns: the W&B / MLflow run of this training run,
                                                 which every stage and requeue continues

A training checkpoint's record carries the run state (iteration, tokens and samples consumed), the
scheduler position, the layout it was saved with, the tokenizer, and the *effective* training config
(the YAML after every --override / MEGAFOX_OVERRIDES), so a resume can tell what changed since. A
model-only record (from `megafox-from-hf` or `megafox-ckpt reshard`) carries the model, the layout it
is padded for, and where the weights came from.

Format history: megafox-dist-v1 (no effective config, model-only progress at the top level) is read
and upgraded in memory; every save writes the current version. The shell reads records through
`python -m megafox.records ...` (see `main`), never with its own parsing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from megafox.checkpoint.errors import CheckpointError
from megafox.config import ConfigError, ModelConfig, from_dict, load_train_config
from megafox.runtime.cli import run_main
from megafox.runtime.fs import atomic_write_bytes

FORMAT = "megafox-dist-v2"
READABLE_FORMATS = ("megafox-dist-v1", FORMAT)
METADATA_FILE = "megafox.json"
DONE_FORMAT = 2


class RecordError(CheckpointError):
    """A record is unreadable or malformed. The message names the file (and field)."""


@dataclass
class RunState:
    """What survives restarts of a training run, besides the weights and optimizer state."""

    iteration: int = 0  # global steps over the whole run, skipped ones included
    consumed_tokens: int = 0  # over the whole run; equals the LR scheduler's position
    consumed_samples: Dict[str, int] = field(default_factory=dict)  # per stage: the data position
    skipped_steps: int = 0
    last_loss: float = float("nan")


@dataclass
class SavedLayout:
    """The parallel layout a checkpoint was saved with (dp/world unknown for model-only ones)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: Optional[int] = None
    world: Optional[int] = None


@dataclass
class CheckpointRecord:
    iteration: int
    kind: Literal["train", "model-only"]
    model: ModelConfig
    layout: SavedLayout
    tokenizer: Optional[Dict[str, Any]] = None  # {"path", "sha256", "vocab_size", "bos_id", ...}
    # training checkpoints
    stage: Optional[str] = None
    stage_index: Optional[int] = None
    stage_end: bool = False  # the final checkpoint of its stage (never rotated away)
    seq_length: Optional[int] = None
    global_batch_size: Optional[int] = None
    scheduler: Optional[Dict[str, Any]] = None
    run_state: Optional[RunState] = None
    config: Optional[Dict[str, Any]] = None  # the effective TrainConfig, as a mapping
    # model-only checkpoints
    source: Optional[str] = None  # "hf:DIR" or "megafox:DIR"
    progress: Optional[Dict[str, Any]] = None  # for inspection only (e.g. a reshard's origin)
    # integrity: {relative file name: {"size": bytes, "crc32c"/...: hex}} of every file the save wrote
    files: Optional[Dict[str, Dict[str, Any]]] = None
    format: str = FORMAT
    path: Optional[str] = field(default=None, compare=False)  # where it was read from (not saved)

    @property
    def is_training(self) -> bool:
        return self.kind == "train"

    def summary(self) -> Dict[str, Any]:
        """Stage and consumed tokens/samples, whichever kind of checkpoint this is."""
        out: Dict[str, Any] = dict(self.progress or {})
        if self.run_state is not None:
            out.update(stage=self.stage, consumed_tokens=self.run_state.consumed_tokens,
                       consumed_samples=dict(self.run_state.consumed_samples))
        return out

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n"


@dataclass
class StageDone:
    """<checkpoint.dir>/<stage>.done: the stage reached its budget; the next stage starts from
    `iteration`'s checkpoint. `documents` names the record of the documents the stage read
    (relative to the checkpoint dir), when one was written."""

    stage: str
    iteration: int
    consumed_tokens: int
    stage_samples: int
    loss: float = float("nan")
    documents: Optional[str] = None
    version: int = DONE_FORMAT


TRACKERS_FILE = "trackers.json"


@dataclass
class TrackerRuns:
    """The experiment-tracker runs a training run logs to (one per tracker, for the whole curriculum)."""

    wandb_id: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    mlflow_tracking_uri: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# files

def write_json_atomic(path: Union[str, Path], text: str) -> None:
    """Readers see the old file or the new one, never a part of one."""
    atomic_write_bytes(str(path), text.encode())


def _load_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: unreadable {what} (not a JSON object)")
    return data


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if type(obj).__module__ == "torch":  # a dtype in a config
        return str(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# checkpoint records

def write_checkpoint_record(directory: Union[str, Path], record: CheckpointRecord) -> Path:
    path = Path(directory) / METADATA_FILE
    write_json_atomic(path, record.to_json())
    return path


def read_checkpoint_record(directory: Union[str, Path]) -> CheckpointRecord:
    """The record of one iteration directory; RecordError naming the file and field if malformed."""
    path = Path(directory) / METADATA_FILE
    data = _load_json(path, "checkpoint record")
    fmt = data.get("format")
    if fmt not in READABLE_FORMATS:
        raise RecordError(f"{path}: unknown checkpoint format {fmt!r} (this megafox reads {', '.join(READABLE_FORMATS)})")
    if fmt == "megafox-dist-v1":
        data = _upgrade_v1(data)
    try:
        record = _checkpoint_from_dict(data, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{path}: malformed checkpoint record ({type(exc).__name__}: {exc})") from None
    record.path = str(Path(directory))
    return record


def _checkpoint_from_dict(data: Dict[str, Any], path: Path) -> CheckpointRecord:
    where = f"{path}"
    known = {f.name for f in dataclasses.fields(CheckpointRecord)} - {"path"}
    data = {k: v for k, v in data.items() if k in known}  # newer optional fields are ignored
    for name in ("iteration", "kind", "model", "layout"):
        if name not in data:
            raise RecordError(f"{where}: field '{name}' missing")
    if data["kind"] not in ("train", "model-only"):
        raise RecordError(f"{where}: field 'kind' must be train or model-only, got {data['kind']!r}")
    if isinstance(data["iteration"], bool) or not isinstance(data["iteration"], int) or data["iteration"] < 0:
        raise RecordError(f"{where}: field 'iteration' must be a non-negative integer, got {data['iteration']!r}")
    try:
        data["model"] = from_dict(ModelConfig, data["model"], f"{where}: model").validate()
        data["layout"] = from_dict(SavedLayout, data["layout"], f"{where}: layout")
        if data.get("run_state") is not None:
            data["run_state"] = from_dict(RunState, data["run_state"], f"{where}: run_state")
    except ConfigError as exc:
        raise RecordError(str(exc)) from None
    record = CheckpointRecord(**data)
    if record.is_training and (record.run_state is None or record.stage is None or record.scheduler is None):
        raise RecordError(f"{where}: a training checkpoint record needs stage, scheduler and run_state")
    return record


def _upgrade_v1(data: Dict[str, Any]) -> Dict[str, Any]:
    """megafox-dist-v1 -> the current fields (same meaning, explicit kind, no effective config)."""
    out = dict(data, format=FORMAT)
    out.pop("config", None)  # v1 kept only the YAML path there
    if data.get("model_only") or data.get("run_state") is None:
        out["kind"] = "model-only"
        progress = {k: data[k] for k in ("stage", "consumed_tokens", "consumed_samples") if data.get(k) is not None}
        out["progress"] = progress or None
        for k in ("model_only", "stage", "consumed_tokens", "consumed_samples", "stage_end"):
            out.pop(k, None)
    else:
        out["kind"] = "train"
    layout = dict(out.get("layout") or {})
    out["layout"] = {k: layout.get(k) for k in ("tp", "pp", "vpp", "dp", "world") if layout.get(k) is not None}
    if isinstance(out.get("tokenizer"), str):
        out["tokenizer"] = {"path": out["tokenizer"]}
    return out


# ----------------------------------------------------------------------------------------------
# stage-done records

def done_path(checkpoint_dir: Union[str, Path], stage: str) -> Path:
    return Path(checkpoint_dir) / f"{stage}.done"


def write_stage_done(checkpoint_dir: Union[str, Path], done: StageDone) -> Path:
    path = done_path(checkpoint_dir, done.stage)
    write_json_atomic(path, json.dumps(dataclasses.asdict(done), indent=2, allow_nan=True) + "\n")
    return path


def read_stage_done(checkpoint_dir: Union[str, Path], stage: str) -> Optional[StageDone]:
    """The stage's .done record, or None when the stage has not finished."""
    path = done_path(checkpoint_dir, stage)
    if not path.is_file():
        return None
    data = _load_json(path, "stage-done record")
    if "version" not in data:  # v1: {stage, iteration, consumed_tokens, stage_samples, loss}
        data = dict(data, version=DONE_FORMAT)
    try:
        done = from_dict(StageDone, data, str(path))
    except ConfigError as exc:
        raise RecordError(str(exc)) from None
    if done.stage != stage:
        raise RecordError(f"{path}: records stage {done.stage!r}, not {stage!r}")
    for name in ("iteration", "consumed_tokens", "stage_samples"):
        value = getattr(done, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RecordError(f"{path}: field '{name}' must be a non-negative integer, got {value!r}")
    return done


def read_tracker_runs(checkpoint_dir: Union[str, Path]) -> TrackerRuns:
    """The run's tracker ids; empty before the first tracker started."""
    path = Path(checkpoint_dir) / TRACKERS_FILE
    if not path.exists():
        return TrackerRuns()
    data = _load_json(path, "tracker run record")
    try:
        return from_dict(TrackerRuns, data, str(path))
    except ConfigError as exc:
        raise RecordError(str(exc)) from None


def write_tracker_runs(checkpoint_dir: Union[str, Path], runs: TrackerRuns) -> Path:
    path = Path(checkpoint_dir) / TRACKERS_FILE
    write_json_atomic(path, json.dumps(dataclasses.asdict(runs), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# the effective config: what a resume compares

def config_mapping(config) -> Dict[str, Any]:
    """A TrainConfig as the plain mapping saved in checkpoints (JSON-safe)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=_json_default, allow_nan=True))


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}, "stages": [{"name": "s1", "x": 2}]} -> {"a.b": 1, "stages.s1.x": 2}."""
    out: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for v in value:
                out.update(flatten({k: x for k, x in v.items() if k != "name"}, f"{name}.{v['name']}."))
            out[name] = [v["name"] for v in value]
        else:
            out[name] = value
    return out


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


# ----------------------------------------------------------------------------------------------
# the tiny CLI the launch scripts read records through

def main(argv: Optional[List[str]] = None) -> int:
    """`python -m megafox.records checkpoint-dir --config C.yaml [--stage S ...]` prints the absolute
    checkpoint.dir of the config with MEGAFOX_OVERRIDES applied (checking the stages exist);
    `python -m megafox.records stage-done --checkpoint-dir D --stage S` exits 0 when S is complete,
    1 when not; `python -m megafox.records show DIR` prints an iteration directory's record.
    Exit 2 with one line on a bad config or a malformed record."""
    parser = argparse.ArgumentParser(prog="python -m megafox.records", description=main.__doc__.split(";")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("checkpoint-dir")
    p.add_argument("--config", required=True)
    p.add_argument("--stage", action="append", default=[])
    p = sub.add_parser("stage-done")
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--stage", required=True)
    p = sub.add_parser("show")
    p.add_argument("directory")
    args = parser.parse_args(argv)
    return run_main(_run_command, args, errors=(ConfigError, CheckpointError), prefix="megafox.records: error: ",
                    os_errors=False, interrupted=None)


def _run_command(args) -> int:
    if args.command == "checkpoint-dir":
        config = load_train_config(args.config, shlex.split(os.environ.get("MEGAFOX_OVERRIDES", "")))
        for stage in args.stage:
            config.stage(stage)
        print(os.path.abspath(os.path.expanduser(config.checkpoint.dir)))
        return 0
    if args.command == "stage-done":
        done = read_stage_done(args.checkpoint_dir, args.stage)
        if done is None:
            return 1
        print(f"{done.stage} complete at iteration {done.iteration} ({done.consumed_tokens} tokens)")
        return 0
    print(read_checkpoint_record(args.directory).to_json(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
