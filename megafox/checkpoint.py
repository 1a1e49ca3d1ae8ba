"""megafox checkpoints: megatron-core dist_checkpointing (torch_dist) plus a small record.

Layout of a checkpoint root:
    ROOT/iter_0000100/          dist_checkpointing directory (model [+ optimizer] shards)
    ROOT/iter_0000100/megafox.json   its CheckpointRecord (megafox.records), written last: its
                                presence marks the save complete
    ROOT/latest                 text file naming the newest complete iteration, replaced atomically

Shared by the trainer and `checkpoints_tools`, so it sits below both. dist_checkpointing stores
global (unsharded) tensor layouts, so a checkpoint saved at one TP/PP/DP loads at another.

Training checkpoints (`save_training_checkpoint`) add the optimizer state, every rank's RNG
states, and in megafox.json the scheduler position and the data state (consumed samples per
stage). With the distributed optimizer (format `sharded`, the default) every data-parallel rank
writes only the ranges of the weights and optimizer state it owns, as rectangles of the global
tensors (megafox.checkpoint_sharding), and a resume reads only the ranges it will own; format
`gathered` is megatron-core's `fully_reshardable` save (the whole state all-gathered to every
rank first). Both hold the same tensors under the same keys. Saves run through CheckpointSaver:
synchronous, or asynchronous (the shards written by threads while training goes on, the record
and `latest` only once every rank's files are on disk). Old ones are rotated: the newest
`keep_last` plus every stage end are kept. Loading unpickles nothing but data
(megafox.safe_load, wired in by megafox.compat.megatron_core.safe_checkpoint_loading).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from megafox import checkpoint_integrity
from megafox.checkpoint_integrity import digest_saved_files
from megafox.checkpoint_sharding import (OPTIMIZER_STATE_KEYS, OPTIMIZER_STATE_PREFIX, ddp_params,
                                         distributed_optimizers, owned_params, pop_param_entries, sharded_tensor)
from megafox.checkpoint_writer import ThreadCallsQueue, WriteDigests, in_threads
from megafox.compat import megatron_core as mcore_compat
from megafox.records import (METADATA_FILE, CheckpointError, CheckpointRecord, SavedLayout, read_checkpoint_record,
                             write_checkpoint_record)

LATEST_FILE = "latest"
# Called by every rank once a save's shards are on disk and before its record is written.
BeforeCommit = Callable[[Path], None]


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, I/O error); says why and which checkpoint is still good.

    A full disk leads the message (what is full, how much is free, which checkpoint is still the
    latest): torch's zip writer reports it as a long internal line that names no cause, so the
    library's words come last."""

    def __init__(self, root: Union[str, Path], iteration: int, cause: BaseException):
        reason = _root_cause(cause)
        try:
            last = resolve_iteration(root)
            good = f"iteration {last} is still the latest checkpoint ({root}, untouched)"
        except CheckpointError:
            last, good = None, f"there is no complete checkpoint in {root} yet"
        full = _disk_full(Path(root), last)
        failed = f"saving iteration {iteration} to {iteration_dir(root, iteration)} failed: {reason}"
        if full:
            super().__init__(f"the disk is full: {full}; {good}; {failed}; free space, then rerun to resume")
        else:
            super().__init__(f"{failed}; {good}")


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
    return f"{free / 2**20:.1f} MiB free, a save needs {need / 2**20:.1f} MiB" if free < need else None


class NoUsableCheckpoint(CheckpointError):
    """Every checkpoint a resume could start from is incomplete or corrupt (exit status 4)."""


@contextmanager
def _checkpoint_errors_unwrapped():
    """Raise a CheckpointError some rank hit inside a collective load as itself (one line naming
    the file), not as the CheckpointException torch.distributed.checkpoint wraps it in."""
    try:
        yield
    except BaseException as exc:
        found = _checkpoint_error_in(exc)
        if found is None or found is exc:
            raise
        raise found from None


def _checkpoint_error_in(exc: BaseException) -> Optional[CheckpointError]:
    """A CheckpointError (a refused object, a missing file) some rank raised inside a collective
    load, which torch.distributed.checkpoint reports on every rank wrapped in its own exception."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CheckpointError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            for _, failure in sorted(failures.items()):
                inner = getattr(failure, "exc", failure)
                todo.append(inner[0] if isinstance(inner, tuple) and inner else inner)
        todo += [current.__cause__, current.__context__]
    return None


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


# ----------------------------------------------------------------------------------------------
# Saving. Every save, synchronous or not, goes through CheckpointSaver: megatron-core plans it and
# stages a host copy of every tensor (the call blocks for that much), the shards are written by
# threads of this process (megafox.checkpoint_writer), and the save is committed (digests,
# megafox.json, `latest`, rotation) on every rank once all ranks' files are on disk.

@dataclass
class _PendingSave:
    root: Path
    iteration: int
    path: Path
    record: CheckpointRecord
    update_latest: bool
    keep_last: Optional[int]
    before_commit: Optional[BeforeCommit]
    digests: WriteDigests
    started: float  # time.monotonic() when the save was called
    stall: float  # seconds the caller was blocked by planning and staging
    staged: float  # of which the copy to host memory


@dataclass
class SaveReport:
    """A committed save: where, and how long it held the caller up and took in all."""

    path: Path
    iteration: int
    stall_s: float  # planning + copy to host: the time the training loop stood still for it
    total_s: float  # from the call to the commit
    staged_s: float = 0.0  # the copy to host memory, part of stall_s


class CheckpointSaver:
    """Saves checkpoints, at most one in flight. With `async_save` the call returns once the state
    is staged in host memory and the shards are written in the background while training goes
    on; `poll()` (after each step) commits the save once every rank has written its files, and
    `wait()` (before a stop, the end of a stage, another save) waits for that. A save that is never
    committed (the process dies) leaves `latest` on the previous checkpoint. Every method is
    collective: all ranks call it at the same point."""

    def __init__(self, async_save: bool = False):
        self.async_save = async_save
        self.queue = ThreadCallsQueue()
        self.pending: Optional[_PendingSave] = None

    @property
    def pending_iteration(self) -> Optional[int]:
        return self.pending.iteration if self.pending is not None else None

    def save(self, root: Union[str, Path], iteration: int, state: Dict[str, Any], record: CheckpointRecord,
             update_latest: bool = True, keep_last: Optional[int] = None,
             before_commit: Optional[BeforeCommit] = None, sharded_strategy=None) -> Optional[SaveReport]:
        """Save `state` (a sharded state dict) as iteration `iteration` of `root`. Returns the
        report when the save is committed before returning (always, unless `async_save`)."""
        from megatron.core import dist_checkpointing

        self.wait()
        t0 = time.monotonic()
        root = Path(root)
        path = _prepare_iteration_dir(root, iteration)
        mcore_compat.write_results_in_process()
        try:
            staged = time.monotonic()
            # asynchronous: the training loop changes the live tensors from the next step on
            _stage_on_host(state, everything=self.async_save)
            staged = time.monotonic() - staged
            request = dist_checkpointing.save(state, str(path), sharded_strategy=sharded_strategy or _strategy(),
                                              async_sharded_save=True)
            digests = WriteDigests()
            self.queue.schedule_async_request(in_threads(request, digests, background=self.async_save))
        except BaseException as exc:  # torch's CheckpointException derives from BaseException
            raise _save_failed(root, iteration, path, exc) from exc
        # the record describes the state as it is now; the caller's run state moves on meanwhile
        self.pending = _PendingSave(root, iteration, path, copy.deepcopy(record), update_latest, keep_last,
                                    before_commit, digests, started=t0, stall=time.monotonic() - t0, staged=staged)
        return None if self.async_save else self.wait()

    def poll(self) -> Optional[SaveReport]:
        """Commit the pending save if every rank has finished writing it; never waits."""
        return self._finish(blocking=False) if self.pending is not None else None

    def wait(self) -> Optional[SaveReport]:
        """Wait for the pending save's writes and commit it (None when there is none)."""
        return self._finish(blocking=True) if self.pending is not None else None

    def abandon(self) -> Optional[int]:
        """Give up a pending save without committing it (after a failure elsewhere, when the other
        ranks may not reach a collective): its directory stays without megafox.json, `latest` stays
        on the previous checkpoint. Returns its iteration."""
        pending, self.pending = self.pending, None
        return pending.iteration if pending is not None else None

    def _finish(self, blocking: bool) -> Optional[SaveReport]:
        pending = self.pending
        try:
            if not self.queue.maybe_finalize_async_calls(blocking=blocking):
                return None
        except BaseException as exc:
            self.pending = None
            raise _save_failed(pending.root, pending.iteration, pending.path, exc) from exc
        self.pending = None
        _commit(pending)
        return SaveReport(pending.path, pending.iteration, pending.stall, time.monotonic() - pending.started,
                          pending.staged)


def _strategy():
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1)


def _prepare_iteration_dir(root: Path, iteration: int) -> Path:
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
    return path


def _save_failed(root: Path, iteration: int, path: Path, exc: BaseException) -> BaseException:
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return exc
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # never complete, never referenced: give the space back
    return CheckpointSaveError(root, iteration, exc)


def _commit(pending: _PendingSave) -> None:
    """Every rank's shards are on disk: record the digests, then megafox.json, then `latest`."""
    files = digest_saved_files(pending.path, written=pending.digests.files)
    if pending.before_commit is not None:
        pending.before_commit(pending.path)
    if _rank() == 0:
        record = dataclasses.replace(pending.record, iteration=pending.iteration, files=files)
        if record.layout is None:
            record.layout = layout_signature()
        write_checkpoint_record(pending.path, record)
        if pending.update_latest:
            write_latest(pending.root, pending.iteration)
        if pending.keep_last is not None:
            rotate_checkpoints(pending.root, pending.keep_last)
    _barrier()


def _stage_on_host(state: Dict[str, Any], everything: bool) -> None:
    """Replace the tensors the save will write by private host copies (in place), one copy per
    memory region: in fp32 training the model weights and the optimizer's main weights are the
    same memory and are copied once. Views are always copied (megatron-core's writer would clone
    each of them anyway, twice where two keys share memory); with `everything`, whole tensors too,
    so the training loop may change the live ones while the writer threads write."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)
    copies: Dict[Tuple[int, torch.dtype, Tuple[int, ...], Tuple[int, ...]], torch.Tensor] = {}
    for item in nested_values(state):
        if isinstance(item, ShardedTensor) and item.data is not None:
            data = item.data.detach()
            whole = data.untyped_storage().nbytes() == data.numel() * data.element_size()
            if whole and data.is_cpu and not everything:
                continue
            key = (data.data_ptr(), data.dtype, tuple(data.shape), tuple(data.stride()))
            if key not in copies:
                copies[key] = torch.empty(data.shape, dtype=data.dtype, device="cpu").copy_(data)
            item.data = copies[key]


def save_checkpoint(root: Union[str, Path], iteration: int, chunks: List[torch.nn.Module],
                    record: CheckpointRecord, extra_sharded: Optional[Dict[str, Any]] = None,
                    update_latest: bool = True, before_commit: Optional[BeforeCommit] = None) -> Path:
    """Save model chunks (and any extra sharded state) collectively and synchronously.

    Every rank calls this. `record` is written by rank 0 after all shards are on disk, and only
    then does `latest` move.
    """
    state = model_sharded_state_dict(chunks)
    if extra_sharded:
        state.update(extra_sharded)
    return CheckpointSaver().save(root, iteration, state, record, update_latest, before_commit=before_commit).path


# ----------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer + RNG + (in megafox.json) scheduler and data state.

# checkpoint.format (megafox.config.CheckpointConfig): how the distributed optimizer's state is
# saved. Both write the same global tensors under the same keys, so either loads the other.
FORMATS = ("sharded", "gathered")
# `gathered`: megatron-core's `fully_reshardable` save, which all-gathers the whole optimizer
# state to every DP rank first (mcore 0.16 rejects the flattened tensors of
# `fully_sharded_model_space`).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def layout_signature() -> SavedLayout:
    from megatron.core import parallel_state as ps

    return SavedLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                       vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
                       dp=ps.get_data_parallel_world_size(),
                       world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)


def get_rng_state() -> Dict[str, Any]:
    """Every RNG stream of this rank, as data `torch.load(weights_only=True)` reads back: tensors,
    lists, numbers (numpy's key array becomes a tensor)."""
    import numpy as np
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned (or what megafox saved before it converted numpy's
    state: a numpy array and tuples)."""
    import numpy as np
    from megatron.core import tensor_parallel

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
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


def saves_by_range(optimizer, format: str = "sharded") -> bool:
    """Whether a training save writes only this rank's distributed-optimizer ranges (so the
    other ranks' updated weights need not be gathered first)."""
    return format == "sharded" and bool(distributed_optimizers(optimizer))


def training_state(chunks: List[torch.nn.Module], optimizer, format: str = "sharded") -> Tuple[Dict[str, Any], Any]:
    """The sharded state dict of a training save, and the save strategy it needs."""
    if format not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
    state = model_sharded_state_dict(chunks)
    strategy = None
    if saves_by_range(optimizer, format):
        state["optimizer"] = _optimizer_by_range(chunks, optimizer, state)
    else:
        with mcore_compat.optimizer_state_in_buffer_coordinates(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
        if format == "sharded":  # a non-distributed optimizer: its state is replicated over DP
            strategy = _spread_over_dp(_strategy())
    state["rng_state"] = _rng_sharded(get_rng_state())
    return state, strategy


def _optimizer_by_range(chunks: List[torch.nn.Module], optimizer, model_state: Dict[str, Any]) -> Dict[str, Any]:
    """The optimizer part of a `sharded` save; the model weights of the DDP parameters move from
    `model_state` into it as this rank's ranges (megafox.checkpoint_sharding)."""
    entries = pop_param_entries(model_state, ddp_params(chunks))
    parts = distributed_optimizers(optimizer)
    commons = [dict(part.state_dict(), param_state_sharding_type="fully_reshardable") for part, _ in parts]
    by_part: Dict[int, Dict[str, Any]] = {id(part): {} for part, _ in parts}
    for owned in owned_params(optimizer, entries):
        tensors = by_part[id(owned.optimizer)]
        shards = owned.state_shards()
        for piece in owned.pieces:
            where = f"{piece.key}@{','.join(map(str, piece.global_offset))}"
            tensors[f"weight:{where}"] = sharded_tensor(piece, owned.weight_shard())
            for name in OPTIMIZER_STATE_KEYS:
                tensors[f"{name}:{where}"] = sharded_tensor(
                    piece, shards[name], f"{owned.key_prefix}{OPTIMIZER_STATE_PREFIX}.{name}.")
    for common, (part, _) in zip(commons, parts):
        common["param_state"] = by_part[id(part)]
    return commons[0] if len(commons) == 1 else dict(enumerate(commons))


def _spread_over_dp(strategy):
    """Replicated tensors (the model, a non-distributed optimizer's state) written by all DP
    ranks in turn instead of by DP rank 0 alone (Megatron-LM's --ckpt-fully-parallel-save)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    if ps.get_data_parallel_world_size() == 1:
        return strategy
    return FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))


def save_training_checkpoint(root: Union[str, Path], iteration: int, chunks: List[torch.nn.Module],
                             optimizer, record: CheckpointRecord, keep_last: Optional[int] = None,
                             before_commit: Optional[BeforeCommit] = None, format: str = "sharded",
                             saver: Optional[CheckpointSaver] = None) -> Optional[Path]:
    """Everything needed to continue bit-exactly (same layout) or equivalently (any layout).

    `record` carries the scheduler and data state; its `stage_end` protects the checkpoint from
    rotation. Returns the checkpoint's path once committed; None when `saver` saves
    asynchronously and the save is still being written (see CheckpointSaver).
    """
    state, strategy = training_state(chunks, optimizer, format)
    report = (saver or CheckpointSaver()).save(root, iteration, state, record, keep_last=keep_last,
                                               before_commit=before_commit, sharded_strategy=strategy)
    return report.path if report is not None else None

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


# ----------------------------------------------------------------------------------------------
# Loading. Every file megatron-core unpickles on the way is read as data only
# (megafox.compat.megatron_core.safe_checkpoint_loading).

def load_model(root: Union[str, Path], chunks: List[torch.nn.Module],
               iteration: Union[int, str, None] = "latest") -> CheckpointRecord:
    """Load model weights (any saved TP/PP layout) into `chunks`; return the checkpoint's record."""
    from megatron.core import dist_checkpointing

    record = read_record(root, iteration)
    with mcore_compat.safe_checkpoint_loading(), _checkpoint_errors_unwrapped():
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), record.path)
    _load_chunks(chunks, loaded)
    return record


def _load_chunks(chunks: List[torch.nn.Module], loaded: Dict[str, Any]) -> None:
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)


def load_training_checkpoint(root: Union[str, Path], chunks: List[torch.nn.Module], optimizer,
                             iteration: Union[int, str, None] = "latest",
                             load_optimizer: bool = True) -> Tuple[CheckpointRecord, bool]:
    """Load model, optimizer and (when saved on this same layout) RNG states.

    Returns the record and whether the RNG streams were restored: the optimizer loads at any
    TP/PP/DP layout, but RNG streams are per rank and only mean something on the same layout.
    With the distributed optimizer each rank reads only its own ranges of the weights and of the
    optimizer state (whatever format and layout the checkpoint was saved with) and the weights
    are then all-gathered over DP, as after an optimizer step.
    """
    from megatron.core import dist_checkpointing

    record = read_record(root, iteration)
    same_layout = record.layout == layout_signature()
    with mcore_compat.safe_checkpoint_loading():
        if load_optimizer and "optimizer" not in _saved_top_keys(record.path):
            raise CheckpointError(f"{record.path}: has no optimizer state (a model-only checkpoint); "
                                  "it can initialize weights but not resume training")
        state = model_sharded_state_dict(chunks)
        by_range = bool(distributed_optimizers(optimizer))
        if by_range:
            state["by_range"] = _prepare_load_by_range(record.path, chunks, optimizer, state, load_optimizer)
        elif load_optimizer:
            mcore_compat.init_torch_adam_state(optimizer)
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
        if same_layout:
            state["rng_state"] = _rng_sharded(None)
        with _checkpoint_errors_unwrapped():
            loaded = dist_checkpointing.load(state, record.path, sharded_strategy=None if by_range else _read_over_dp())
    _load_chunks(chunks, loaded)
    if by_range:
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)  # every rank's loaded ranges to every rank
        if not load_optimizer:
            optimizer.reload_model_params()
    elif load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        mcore_compat.unalias_adam_steps(optimizer)
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return record, same_layout


def _prepare_load_by_range(path: str, chunks: List[torch.nn.Module], optimizer, model_state: Dict[str, Any],
                           load_optimizer: bool) -> Dict[str, Any]:
    """Set the optimizer's non-tensor state (param groups, step) from common.pt and return the
    ShardedTensors that load this rank's ranges straight into the live tensors."""
    from megatron.core import dist_checkpointing

    entries = pop_param_entries(model_state, ddp_params(chunks))
    parts = distributed_optimizers(optimizer)
    if load_optimizer:
        mcore_compat.init_torch_adam_state(optimizer)
        saved = dist_checkpointing.load_common_state_dict(path).get("optimizer")
        commons = [saved] if len(parts) == 1 else [saved.get(i, saved.get(str(i))) for i in range(len(parts))]
        for (part, _), common in zip(parts, commons):
            part.load_state_dict({k: v for k, v in common.items() if k not in ("param_state", "param_state_sharding_type")})
        mcore_compat.unalias_adam_steps(optimizer)
    targets: Dict[str, Any] = {}
    for owned in owned_params(optimizer, entries):
        shards = owned.state_shards() if load_optimizer else {}
        # fp32 training: the main weights are the model weights' memory; they come from the
        # optimizer state (the exact fp32 values), not twice
        weight = not (load_optimizer and owned.main_is_weight())
        for piece in owned.pieces:
            where = f"{piece.key}@{','.join(map(str, piece.global_offset))}"
            if weight:
                targets[f"weight:{where}"] = sharded_tensor(piece, owned.weight_shard())
            for name, shard in shards.items():
                targets[f"{name}:{where}"] = sharded_tensor(
                    piece, shard, f"{owned.key_prefix}{OPTIMIZER_STATE_PREFIX}.{name}.")
    return targets


def _read_over_dp():
    """Replicated tensors read once over the DP group and exchanged, not once per DP rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    if ps.get_data_parallel_world_size() == 1:
        return None
    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _saved_top_keys(path: Union[str, Path]) -> set:
    from megatron.core import dist_checkpointing

    with mcore_compat.safe_checkpoint_loading():
        return {key.split(".")[0] for key in dist_checkpointing.load_tensors_metadata(str(path))}

def verify(directory: Union[str, Path], files: Optional[Dict[str, Dict[str, Any]]]) -> Optional[str]:
    """The first problem that makes a saved checkpoint unusable, or None. Collective when
    distributed. Its files against the digests the save recorded (megafox.checkpoint_integrity),
    then the pickled index files a load opens first: anything in them but plain data (code
    planted in `.metadata` or `common.pt`) is named and never run."""
    problem = checkpoint_integrity.verify(Path(directory), files)
    if problem is None:
        problem = checkpoint_integrity.agree(
            checkpoint_integrity.check_loads_without_code(Path(directory)) if _rank() == 0 else None)
    return problem


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
