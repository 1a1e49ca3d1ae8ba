"""megafox checkpoints: megatron-core dist_checkpointing (torch_dist) plus a small record.

Layout of a checkpoint root:
    ROOT/iter_0000100/          dist_checkpointing directory (model [+ optimizer] shards)
    ROOT/iter_0000100/megafox.json   its CheckpointRecord (megafox.records), written last: its
                                presence marks the save complete
    ROOT/latest                 text file naming the newest complete iteration, replaced atomically

Shared by the trainer and `checkpoints_tools`, so it sits below both. dist_checkpointing stores
global (unsharded) tensor layouts, so a checkpoint saved at one TP/PP loads at another.

Training checkpoints (`save_training_checkpoint`) add the optimizer state (the distributed
optimizer in the `fully_reshardable` format: one global tensor per parameter, so it
reloads at any TP/PP/DP), every rank's RNG states, and in megafox.json the scheduler position
and the data state (consumed samples per stage). Old ones are rotated: the newest `keep_last`
plus every stage end are kept.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from megafox.checkpoint_integrity import digest_saved_files, verify
from megafox.compat import megatron_core as mcore_compat
from megafox.records import (METADATA_FILE, CheckpointError, CheckpointRecord, SavedLayout, read_checkpoint_record,
                             write_checkpoint_record)

LATEST_FILE = "latest"
# Called by every rank once a save's shards are on disk and before its record is written.
BeforeCommit = Callable[[Path], None]


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, I/O error); says why and which checkpoint is still good."""

    def __init__(self, root: Union[str, Path], iteration: int, cause: BaseException):
        reason = _root_cause(cause)
        try:
            last = resolve_iteration(root)
            good = f"the last complete checkpoint is iteration {last} in {root}, untouched"
        except CheckpointError:
            last, good = None, f"there is no complete checkpoint in {root} yet"
        full = _disk_full(Path(root), last)
        super().__init__(f"saving iteration {iteration} to {iteration_dir(root, iteration)} failed: {reason}"
                         + (f" (the disk is full: {full}; free space, then rerun to resume)" if full else "")
                         + f"; {good}")


def _disk_full(root: Path, last: Optional[int]) -> Optional[str]:
    """torch's zip writer reports a full disk as 'unexpected pos ...', not ENOSPC: judge by the
    free space left, against the size of the last complete checkpoint (what a save needs)."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    need = 64 << 20
    if last is not None:
        need = max(need // 64, sum(f.stat().st_size for f in iteration_dir(root, last).iterdir() if f.is_file()))
    return f"{free / 2**20:.1f} MiB free on its filesystem, a checkpoint needs about {need / 2**20:.1f}" \
        if free < need else None


class NoUsableCheckpoint(CheckpointError):
    """Every checkpoint a resume could start from is incomplete or corrupt (exit status 4)."""


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (torch wraps each rank's failure in CheckpointException)."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = getattr(failure, "exc", failure)  # a _WrappedException, or the exception itself
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]  # megatron's async writer reports (exception, traceback frames)
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(seen).__name__}: {seen}"


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
                    record: CheckpointRecord, extra_sharded: Optional[Dict[str, Any]] = None,
                    update_latest: bool = True, before_commit: Optional[BeforeCommit] = None) -> Path:
    """Save model chunks (and any extra sharded state, e.g. the optimizer's) collectively.

    Every rank calls this. `record` is written by rank 0 after all shards are on disk, and only
    then does `latest` move.
    """
    state = model_sharded_state_dict(chunks)
    if extra_sharded:
        state.update(extra_sharded)
    return _save_state(root, iteration, state, record, update_latest, before_commit)


def _save_state(root: Union[str, Path], iteration: int, state: Dict[str, Any], record: CheckpointRecord,
                update_latest: bool = True, before_commit: Optional[BeforeCommit] = None) -> Path:
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if _rank() == 0:
        if (path / METADATA_FILE).exists():
            # a complete save of this iteration exists, e.g. one a resume found corrupt and fell
            # back from: it is evidence, so it is kept under another name, never overwritten
            aside = path.with_name(f"{path.name}.superseded-{int(time.time())}")
            os.replace(path, aside)
            print(f"kept the earlier save of iteration {iteration} as {aside}", flush=True)
        elif path.exists():
            shutil.rmtree(path)  # leftovers of a crashed save (no record): start clean
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    mcore_compat.start_writer_processes_shielded()
    try:
        dist_checkpointing.save(state, str(path))
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # never complete, never referenced: give the space back
        raise CheckpointSaveError(root, iteration, exc) from exc
    _barrier()
    files = digest_saved_files(path)
    if before_commit is not None:
        before_commit(path)
    if _rank() == 0:
        record = dataclasses.replace(record, iteration=iteration, files=files)
        if record.layout is None:
            record.layout = layout_signature()
        write_checkpoint_record(path, record)
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


def load_model(root: Union[str, Path], chunks: List[torch.nn.Module],
               iteration: Union[int, str, None] = "latest") -> CheckpointRecord:
    """Load model weights (any saved TP/PP layout) into `chunks`; return the checkpoint's record."""
    from megatron.core import dist_checkpointing

    record = read_record(root, iteration)
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), record.path)
    _load_chunks(chunks, loaded)
    return record


def _load_chunks(chunks: List[torch.nn.Module], loaded: Dict[str, Any]) -> None:
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)


# ----------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer + RNG + (in megafox.json) scheduler and data state.

# mcore 0.16 rejects flattened ShardedTensors, so `fully_sharded_model_space` cannot save;
# `fully_reshardable` (gathered over DP to per-parameter tensors) loads at any TP/PP/DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def layout_signature() -> SavedLayout:
    from megatron.core import parallel_state as ps

    return SavedLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                       vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
                       dp=ps.get_data_parallel_world_size(),
                       world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)


def get_rng_state() -> Dict[str, Any]:
    import numpy as np
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: Any):
    """One object per (pp, tp, dp) rank: RNG streams only mean something on the same layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    lay = layout_signature()
    return ShardedObject("rng_state", state, (lay.pp, lay.tp, lay.dp),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def save_training_checkpoint(root: Union[str, Path], iteration: int, chunks: List[torch.nn.Module],
                             optimizer, record: CheckpointRecord, keep_last: Optional[int] = None,
                             before_commit: Optional[BeforeCommit] = None) -> Path:
    """Everything needed to continue bit-exactly (same layout) or equivalently (any layout).

    `record` carries the scheduler and data state; its `stage_end` protects the checkpoint from
    rotation.
    """
    model_state = model_sharded_state_dict(chunks)
    with mcore_compat.optimizer_state_in_buffer_coordinates(optimizer):
        optimizer_state = optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA)
    extra = {"optimizer": optimizer_state, "rng_state": _rng_sharded(get_rng_state())}
    path = _save_state(root, iteration, dict(model_state, **extra), record, before_commit=before_commit)
    if keep_last is not None and _rank() == 0:
        rotate_checkpoints(root, keep_last)
    _barrier()
    return path


def load_training_checkpoint(root: Union[str, Path], chunks: List[torch.nn.Module], optimizer,
                             iteration: Union[int, str, None] = "latest",
                             load_optimizer: bool = True) -> Tuple[CheckpointRecord, bool]:
    """Load model, optimizer and (when saved on this same layout) RNG states.

    Returns the record and whether the RNG streams were restored: the optimizer loads at any
    TP/PP/DP layout, but RNG streams are per rank and only mean something on the same layout.
    """
    from megatron.core import dist_checkpointing

    record = read_record(root, iteration)
    state = model_sharded_state_dict(chunks)
    if load_optimizer:
        if "optimizer" not in _saved_top_keys(record.path):
            raise CheckpointError(f"{record.path}: has no optimizer state (a model-only checkpoint); "
                                  "it can initialize weights but not resume training")
        mcore_compat.init_torch_adam_state(optimizer)
        with mcore_compat.optimizer_state_in_buffer_coordinates(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    same_layout = record.layout == layout_signature()
    if same_layout:
        state["rng_state"] = _rng_sharded(None)
    loaded = dist_checkpointing.load(state, record.path)
    _load_chunks(chunks, loaded)
    if load_optimizer:
        mcore_compat.load_optimizer_state(optimizer, loaded["optimizer"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return record, same_layout


def _saved_top_keys(path: Union[str, Path]) -> set:
    from megatron.core import dist_checkpointing

    return {key.split(".")[0] for key in dist_checkpointing.load_tensors_metadata(str(path))}


def find_usable_checkpoint(root: Union[str, Path]) -> Tuple[CheckpointRecord, List[str]]:
    """The newest checkpoint under `root` (from `latest` down) whose record reads and whose files
    verify against the digests the save recorded; also the reasons the newer ones were skipped
    (each one line naming the bad file). Nothing is deleted. Collective when distributed: every
    rank verifies its share of the files and all get the same answer.
    Raises NoUsableCheckpoint when none verifies."""
    root = Path(root)
    skipped: List[str] = []
    complete = list(reversed(list_checkpoints(root)))
    try:
        latest = resolve_iteration(root)
        candidates = [latest] + [it for it in complete if it < latest]
    except CheckpointError as exc:  # an unreadable `latest`: every complete checkpoint, newest first
        skipped.append(str(exc))
        candidates = complete
    for iteration in candidates:
        path = iteration_dir(root, iteration)
        try:
            record = read_checkpoint_record(path)
        except CheckpointError as exc:
            skipped.append(f"iteration {iteration}: {exc}")
            continue
        problem = verify(path, record.files)
        if problem is None:
            return record, skipped
        skipped.append(f"iteration {iteration}: {problem}")
    raise NoUsableCheckpoint(f"no usable checkpoint in {root}: " + "; ".join(skipped or ["none complete"]))


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
