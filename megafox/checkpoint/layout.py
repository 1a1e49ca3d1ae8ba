"""Where a checkpoint lives on disk, which one is `latest`, and which ones are kept.

Layout of a checkpoint root:
    ROOT/iter_0000100/          dist_checkpointing directory (model [+ optimizer] shards)
    ROOT/iter_0000100/megafox.json   its CheckpointRecord (megafox.records), written last: its
                                presence marks the save complete
    ROOT/latest                 text file naming the newest complete iteration, replaced atomically

Old checkpoints are rotated: the newest `keep_last` plus every stage end are kept.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Dict, List, Union

from megafox.checkpoint.errors import CheckpointError
from megafox.records import METADATA_FILE, CheckpointRecord, read_checkpoint_record
from megafox.runtime.fs import atomic_write_bytes

LATEST_FILE = "latest"


def iteration_dir(root: Union[str, Path], iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def write_latest(root: Union[str, Path], iteration: int) -> None:
    """Point `latest` at `iteration` atomically."""
    atomic_write_bytes(str(Path(root) / LATEST_FILE), f"{iteration}\n".encode())


def resolve_iteration(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> int:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if iteration in (None, "latest"):
        latest = root / LATEST_FILE
        if not latest.is_file():
            if (root / METADATA_FILE).is_file():  # pointed at an iteration directory itself
                return read_checkpoint_record(root).iteration
            raise CheckpointError(f"{root}: not a megafox checkpoint directory (no '{LATEST_FILE}' file)")
        try:
            return int(latest.read_text().strip())
        except ValueError:
            raise CheckpointError(f"{latest}: does not hold an iteration number") from None
    return int(iteration)


def checkpoint_path(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> Path:
    """The iteration directory for `root` (a checkpoint root or an iteration directory)."""
    root = Path(root)
    if (root / METADATA_FILE).is_file() and not (root / LATEST_FILE).is_file() and iteration in (None, "latest"):
        return root
    path = iteration_dir(root, resolve_iteration(root, iteration))
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{path}: incomplete or not a megafox checkpoint (no {METADATA_FILE})")
    return path


def read_record(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> CheckpointRecord:
    """The CheckpointRecord of `root`'s `latest` (or `iteration`), or of an iteration directory."""
    return read_checkpoint_record(checkpoint_path(root, iteration))


def read_metadata(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> Dict[str, Any]:
    """The record as a plain mapping (with its "path"), for tools that print it."""
    record = read_record(root, iteration)
    return dict(dataclasses.asdict(record), path=record.path)


def list_checkpoints(root: Union[str, Path]) -> List[int]:
    """Iterations with a complete checkpoint under `root`, oldest first."""
    root = Path(root)
    found = []
    for path in root.glob("iter_*"):
        if (path / METADATA_FILE).is_file():
            try:
                found.append(int(path.name[len("iter_"):]))
            except ValueError:
                continue
    return sorted(found)


def rotate_checkpoints(root: Union[str, Path], keep_last: int) -> List[int]:
    """Delete periodic checkpoints beyond the newest `keep_last`, and crash leftovers older than
    `latest`; keep `latest` and every stage end. Returns the deleted iterations."""
    root = Path(root)
    latest = resolve_iteration(root) if (root / LATEST_FILE).is_file() else None
    complete = list_checkpoints(root)
    keep = set(complete[-keep_last:])
    if latest is not None:
        keep.add(latest)
    deleted = []
    for it in complete:
        if it in keep:
            continue
        try:
            if read_checkpoint_record(iteration_dir(root, it)).stage_end:
                continue
        except CheckpointError:
            continue  # an unreadable record is evidence: kept for the operator, never deleted here
        # Metadata goes first: a half-deleted checkpoint then reads as incomplete, never as valid.
        (iteration_dir(root, it) / METADATA_FILE).unlink()
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
        deleted.append(it)
    for path in root.glob("iter_*"):
        try:
            it = int(path.name[len("iter_"):])
        except ValueError:
            continue
        if not (path / METADATA_FILE).is_file() and latest is not None and it < latest:
            shutil.rmtree(path, ignore_errors=True)
    return deleted


def iteration_dirs(root: Union[str, Path], which: Union[int, str]) -> List[Path]:
    """The iteration directories `which` names under `root`: an iteration, "latest" (also `root`
    itself when it is an iteration directory) or "all" complete ones. A latest or numbered
    directory is returned even when incomplete, so that a check can say what is wrong with it."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if which == "all":
        found = [iteration_dir(root, it) for it in list_checkpoints(root)]
        if not found:
            raise CheckpointError(f"{root}: no complete checkpoint (no iter_*/{METADATA_FILE})")
        return found
    if which == "latest" and not (root / LATEST_FILE).is_file() and (root / METADATA_FILE).is_file():
        return [root]  # an iteration directory itself
    directory = iteration_dir(root, resolve_iteration(root, which))
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint (saved: {list_checkpoints(root) or 'none'})")
    return [directory]


def holds_checkpoint(path: Union[str, Path]) -> bool:
    """Whether `path` is a megafox checkpoint root (or one iteration directory of it)."""
    path = Path(path)
    return path.is_dir() and ((path / LATEST_FILE).exists() or (path / METADATA_FILE).exists()
                              or any(p.is_dir() for p in path.glob("iter_*")))


def describe_checkpoint(path: Union[str, Path]) -> str:
    latest = Path(path) / LATEST_FILE
    if latest.is_file():
        return f"a megafox checkpoint (latest = {latest.read_text().strip()})"
    return "a megafox checkpoint"
