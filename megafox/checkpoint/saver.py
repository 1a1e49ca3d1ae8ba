"""Saving checkpoints: CheckpointSaver, synchronous or asynchronous, and the commit protocol.

Every save, synchronous or not, goes through CheckpointSaver: megatron-core plans it and stages a
host copy of every tensor (the call blocks for that much), the shards are written by threads of
this process (megafox.checkpoint.writer), and the save is committed on every rank once all ranks'
files are on disk: the digests (megafox.checkpoint.integrity), then megafox.json, then `latest`,
then rotation (megafox.checkpoint.layout). A save that is never committed leaves `latest` on the
previous checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megafox.checkpoint.errors import CheckpointError, root_cause
from megafox.checkpoint.integrity import digest_saved_files
from megafox.checkpoint.layout import iteration_dir, resolve_iteration, rotate_checkpoints, write_latest
from megafox.checkpoint.state import layout_signature, model_sharded_state_dict, torch_dist_strategy, training_state
from megafox.checkpoint.writer import ThreadCallsQueue, WriteDigests, in_threads
from megafox.compat import megatron_core as mcore_compat
from megafox.records import METADATA_FILE, CheckpointRecord, write_checkpoint_record
from megafox.runtime.dist import barrier, is_rank0

# Called by every rank once a save's shards are on disk and before its record is written.
BeforeCommit = Callable[[Path], None]


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, I/O error); says why and which checkpoint is still good.

    A full disk leads the message (what is full, how much is free, which checkpoint is still the
    latest): torch's zip writer reports it as a long internal line that names no cause, so the
    library's words come last."""

    def __init__(self, root: Union[str, Path], iteration: int, cause: BaseException):
        reason = root_cause(cause)
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
            request = dist_checkpointing.save(state, str(path), sharded_strategy=sharded_strategy or torch_dist_strategy(),
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


def _prepare_iteration_dir(root: Path, iteration: int) -> Path:
    path = iteration_dir(root, iteration)
    if is_rank0():
        if (path / METADATA_FILE).exists():
            # a complete save of this iteration exists, e.g. one a resume found corrupt and fell
            # back from: it is evidence, so it is kept under another name, never overwritten
            aside = path.with_name(f"{path.name}.superseded-{int(time.time())}")
            os.replace(path, aside)
            print(f"kept the earlier save of iteration {iteration} as {aside}", flush=True)
        elif path.exists():
            shutil.rmtree(path)  # leftovers of a crashed save (no record): start clean
        path.mkdir(parents=True, exist_ok=True)
    barrier()
    return path


def _save_failed(root: Path, iteration: int, path: Path, exc: BaseException) -> BaseException:
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return exc
    if is_rank0():
        shutil.rmtree(path, ignore_errors=True)  # never complete, never referenced: give the space back
    return CheckpointSaveError(root, iteration, exc)


def _commit(pending: _PendingSave) -> None:
    """Every rank's shards are on disk: record the digests, then megafox.json, then `latest`."""
    files = digest_saved_files(pending.path, written=pending.digests.files)
    if pending.before_commit is not None:
        pending.before_commit(pending.path)
    if is_rank0():
        record = dataclasses.replace(pending.record, iteration=pending.iteration, files=files)
        if record.layout is None:
            record.layout = layout_signature()
        write_checkpoint_record(pending.path, record)
        if pending.update_latest:
            write_latest(pending.root, pending.iteration)
        if pending.keep_last is not None:
            rotate_checkpoints(pending.root, pending.keep_last)
    barrier()


def _stage_on_host(state: Dict[str, Any], everything: bool) -> None:
    """Replace the tensors the save will write by private host copies (in place), one copy per
    memory region: in fp32 training the model weights and the optimizer's main weights are the
    same memory and are copied once. Views are always copied (megatron-core's writer would clone
    each of them anyway, twice where two keys share memory); with `everything`, whole tensors too,
    so the training loop may change the live ones while the writer threads write."""

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
