"""megafox checkpoints: megatron-core dist_checkpointing (torch_dist) plus a small metadata file.

Layout of a checkpoint root:
    ROOT/iter_0000100/          dist_checkpointing directory (model [+ optimizer] shards)
    ROOT/iter_0000100/megafox.json   metadata, written last: its presence marks the save complete
    ROOT/latest                 text file naming the newest complete iteration, replaced atomically

Shared by the trainer and `checkpoints_tools`, so it sits below both. dist_checkpointing stores
global (unsharded) tensor layouts, so a checkpoint saved at one TP/PP loads at another.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

FORMAT = "megafox-dist-v1"
METADATA_FILE = "megafox.json"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or not a megafox checkpoint. Names the path."""


def iteration_dir(root: Union[str, Path], iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """Keys as Megatron-LM uses them: `model`, or `model0`, `model1`... with virtual pipeline."""
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_latest(root: Union[str, Path], iteration: int) -> None:
    """Point `latest` at `iteration` atomically (write a temp file, fsync, rename)."""
    root = Path(root)
    tmp = root / f".{LATEST_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)


def save_checkpoint(root: Union[str, Path], iteration: int, chunks: List[torch.nn.Module],
                    metadata: Dict[str, Any], extra_sharded: Optional[Dict[str, Any]] = None,
                    update_latest: bool = True) -> Path:
    """Save model chunks (and any extra sharded state, e.g. the optimizer's) collectively.

    Every rank calls this. `metadata` (JSON-serializable) is written by rank 0 after all shards
    are on disk, and only then does `latest` move.
    """
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        stale = path / METADATA_FILE
        if stale.exists():
            stale.unlink()  # re-saving an iteration: incomplete until the new metadata lands
    _barrier()
    state = model_sharded_state_dict(chunks)
    if extra_sharded:
        state.update(extra_sharded)
    dist_checkpointing.save(state, str(path))
    _barrier()
    if _rank() == 0:
        meta = dict(metadata, format=FORMAT, iteration=iteration)
        tmp = path / f".{METADATA_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=_json_default))
        os.replace(tmp, path / METADATA_FILE)
        if update_latest:
            write_latest(root, iteration)
    _barrier()
    return path


def resolve_iteration(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> int:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if iteration in (None, "latest"):
        latest = root / LATEST_FILE
        if not latest.is_file():
            if (root / METADATA_FILE).is_file():  # pointed at an iteration directory itself
                return int(json.loads((root / METADATA_FILE).read_text())["iteration"])
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


def read_metadata(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> Dict[str, Any]:
    path = checkpoint_path(root, iteration)
    meta = json.loads((path / METADATA_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    meta["path"] = str(path)
    return meta


def load_model(root: Union[str, Path], chunks: List[torch.nn.Module],
               iteration: Union[int, str, None] = "latest",
               extra_sharded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load model weights (any saved TP/PP layout) into `chunks`; return (metadata, loaded extras)."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(root, iteration)
    state = model_sharded_state_dict(chunks)
    if extra_sharded:
        state.update(extra_sharded)
    loaded = dist_checkpointing.load(state, meta["path"])
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=False)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
    meta["loaded"] = loaded
    return meta


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")
