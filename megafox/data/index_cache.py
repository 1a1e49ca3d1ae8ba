"""megatron-core's sample-index cache, made safe to read, crash-safe to write, and built by one
process while the others wait on a file instead of a collective.

megatron-core's `GPTDataset` / `BlendedDataset` keep their document/sample/shuffle (and blending)
indices as `.npy` files in `path_to_cache`, named `<md5 of the dataset's description>-<class>-
<split>-<what>.npy`.  As shipped (0.16) it
- reads them with `numpy.load(..., allow_pickle=True)`: a file there that is a pickle, not an
  array, is unpickled, which runs whatever code it names (megafox issue 17);
- writes them with plain `numpy.save` under their final names: a build killed mid-write leaves a
  truncated file that counts as a cache hit on the next start;
- has rank 0 build while every other rank waits in `torch.distributed.barrier()`, which fails after
  the process group's timeout (30 minutes in megafox), and Fox-1's stage-1 index takes longer.

`SafeCacheGPTDataset` / `SafeCacheBlendedDataset` (subclasses of megatron's, same file names and
hashes, so caches built before stay valid) load each file with `allow_pickle=False,
mmap_mode="r"` and refuse anything that is not a plain integer array with one `DataError` line
naming the file; they build through megatron's own code into a scratch directory and move the
finished files into place with `os.replace` (description last), and then memory-map them like
every other rank does.  `NoBarrierBuilder` is megatron's `BlendedMegatronDatasetBuilder` without its
barriers; `rank0_first` orders the ranks instead: rank 0 builds (under `cache_lock`), then writes a
flag file; the other ranks poll for it, so a build may take as long as it takes.  They give up
only if rank 0 stops showing signs of life (its heartbeat file stops changing for
`HEARTBEAT_STALE_S`), or fail with rank 0's own error message when its build failed.

Megatron's readers not reached by megafox: the `defer_npy_index_mmap` lazy loads (megafox never
sets that option) and `masked_dataset.py` (BERT/T5 only).
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from typing import Callable, Dict, Optional, Sequence, TypeVar

import numpy as np
import torch

from megafox.data.blend import DataError
from megafox.runtime.fs import atomic_write_bytes

from megatron.core.datasets import blended_dataset
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.utils import Split

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = ".build-"  # per-build scratch directories inside the cache dir
FLAG_PREFIX = ".rank0-"  # rank-0 start/heartbeat, done and failed flags of one start
HEARTBEAT_S = 20.0  # rank 0 rewrites its heartbeat this often while it builds
HEARTBEAT_STALE_S = 30 * 60.0  # a heartbeat unchanged this long: rank 0 is gone
START_GRACE_S = 120.0  # how long the other ranks wait to see rank 0's start flag (NFS caching)
FLAG_MAX_AGE_S = 7 * 24 * 3600.0  # flags of finished starts older than this are removed


# ------------------------------------------------------------------------------------ file I/O
def open_npy(path: str, missing: str) -> np.ndarray:
    """One .npy array as a read-only memory map, never unpickling: DataError naming the file when it
    is missing (`missing` says why that is wrong), a pickle or object array, an archive, or damaged."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing ({missing})") from None
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc)
        if "pickle" in text or "Python objects" in text:
            text = "it holds pickled Python objects, refused: loading them could run code from the file"
        raise DataError(f"{path}: not a plain .npy array ({text})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive opens as a lazy NpzFile
        getattr(array, "close", lambda: None)()
        raise DataError(f"{path}: not a plain .npy array (an archive)")
    return array


def load_index_array(path: str, ndim: int) -> np.ndarray:
    """A cached megatron index as a read-only memory map; DataError unless a plain integer array."""
    try:
        array = open_npy(path, "rank 0 built the indices elsewhere? cache_dir must be on a filesystem every rank sees")
    except DataError as exc:
        raise DataError(f"data cache {exc}; delete it to rebuild") from None
    if array.dtype.kind not in "iu" or array.ndim != ndim:
        raise DataError(f"data cache {path}: not a megatron index array (dtype {array.dtype}, "
                        f"{array.ndim} dimensions; expected {ndim}-dimensional integers); delete it to rebuild")
    return array


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(scratch: str, cache_dir: str, names: Sequence[str]) -> None:
    """Move finished files from `scratch` into `cache_dir`, durably, the last name last.

    megatron counts a cache hit when every file of a dataset exists, so until the last rename the
    cache still misses, and a crash at any point leaves either the old state or the whole set."""
    for name in names:
        _fsync(os.path.join(scratch, name))
    for name in names:
        os.replace(os.path.join(scratch, name), os.path.join(cache_dir, name))
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def scratch_dir(cache_dir: str):
    path = os.path.join(cache_dir, f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _dist_rank() -> Optional[int]:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else None


def _is_builder() -> bool:
    return _dist_rank() in (None, 0)


# ------------------------------------------------------------------------ megatron's datasets
class SafeCacheGPTDataset(GPTDataset):
    """GPTDataset whose index cache is read with allow_pickle=False and written atomically."""

    def _build_document_sample_shuffle_indices(self):
        cache = self.config.path_to_cache
        if not cache:  # megatron would fall back to a directory next to the data: megafox always sets one
            raise DataError("data cache_dir: not set")
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        names = [f"{base}-{affix}" for affix in ("document_index.npy", "sample_index.npy",
                                                  "shuffle_index.npy", "description.txt")]
        if not all(os.path.isfile(os.path.join(cache, n)) for n in names):
            if not _is_builder():
                raise DataError(f"data cache_dir {cache}: rank {_dist_rank()} does not see the index files "
                                f"rank 0 built ({names[-1]}); cache_dir must be on a filesystem every rank sees")
            config = self.config
            with scratch_dir(cache) as scratch:
                # megatron's own build, saved into the scratch directory, then moved into place
                self.config = _with_cache(config, scratch)
                try:
                    super()._build_document_sample_shuffle_indices()
                finally:
                    self.config = config
                publish(scratch, cache, names)
        # every rank, the builder too (its in-memory copies are dropped): read-only memory maps
        return (load_index_array(os.path.join(cache, names[0]), 1),
                load_index_array(os.path.join(cache, names[1]), 2),
                load_index_array(os.path.join(cache, names[2]), 1))


class SafeCacheBlendedDataset(BlendedDataset):
    """BlendedDataset whose blending indices are cached the same way, with or without torch.distributed
    (megatron's own cache path calls torch.distributed.get_rank(), so it fails in one process)."""

    def _build_indices(self):
        cache = self.config.path_to_cache
        if not cache:
            raise DataError("data cache_dir: not set")
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}"
        names = [f"{base}-{affix}" for affix in ("dataset_index.npy", "dataset_sample_index.npy", "description.txt")]
        if not all(os.path.isfile(os.path.join(cache, n)) for n in names):
            if not _is_builder():
                raise DataError(f"data cache_dir {cache}: rank {_dist_rank()} does not see the index files "
                                f"rank 0 built ({names[-1]}); cache_dir must be on a filesystem every rank sees")
            config = self.config
            self.config = _with_cache(config, None)  # megatron builds in memory and saves nothing
            try:
                dataset_index, dataset_sample_index = super()._build_indices()
            finally:
                self.config = config
            with scratch_dir(cache) as scratch:
                np.save(os.path.join(scratch, names[0]), dataset_index, allow_pickle=False)
                np.save(os.path.join(scratch, names[1]), dataset_sample_index, allow_pickle=False)
                with open(os.path.join(scratch, names[2]), "wt") as f:
                    f.write(self.unique_description)
                publish(scratch, cache, names)
            del dataset_index, dataset_sample_index
        return (load_index_array(os.path.join(cache, names[0]), 1),
                load_index_array(os.path.join(cache, names[1]), 1))


def _with_cache(config, path: Optional[str]):
    config = copy.copy(config)
    config.path_to_cache = path
    return config


class _DropUncachedWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()


logging.getLogger(blended_dataset.__name__).addFilter(_DropUncachedWarning())


class NoBarrierBuilder(BlendedMegatronDatasetBuilder):
    """megatron's builder without its rank-0-first barriers (`rank0_first` orders the ranks), building
    SafeCacheBlendedDataset wherever megatron would build a BlendedDataset."""

    blended_class = SafeCacheBlendedDataset  # a subclass names its own (its name is part of the cache keys)

    @classmethod
    def build_generic_dataset(cls, dataset_class, is_built_on_rank, synchronize_ranks, *args):
        if dataset_class is BlendedDataset:
            dataset_class = cls.blended_class
        return BlendedMegatronDatasetBuilder.build_generic_dataset(dataset_class, is_built_on_rank, False, *args)

    def _build_megatron_datasets_parallel(self, prefixes, split, sizes_per_dataset):
        # megatron's version: rank 0 builds, barrier, the other ranks build (serially with the
        # default num_dataset_builder_threads=1, as here); this one leaves out the barrier
        built = [[] for _ in Split]
        for prefix, sizes in zip(prefixes, sizes_per_dataset):
            for i, dataset in enumerate(self._build_megatron_dataset_splits(prefix, split, sizes, False)):
                built[i].append(dataset)
        return built


# ------------------------------------------------------------------ one builder, then the rest
@contextlib.contextmanager
def cache_lock(cache_dir: str):
    """Exclusive lock on cache_dir/.lock (separate jobs sharing a cache never build the same files
    at once); the holder also removes scratch directories that killed builds left behind."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        handle = open(os.path.join(cache_dir, ".lock"), "a")
    except OSError as exc:
        raise DataError(f"data cache_dir {cache_dir}: not writable ({exc.strerror})") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            now = time.time()
            for name in os.listdir(cache_dir):
                path = os.path.join(cache_dir, name)
                if name.startswith(SCRATCH_PREFIX):  # no build runs without this lock
                    shutil.rmtree(path, ignore_errors=True)
                elif name.startswith(FLAG_PREFIX):
                    with contextlib.suppress(OSError):
                        if now - os.path.getmtime(path) > FLAG_MAX_AGE_S:
                            os.remove(path)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


T = TypeVar("T")


def _write_flag(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class _Heartbeat:
    """Rank 0 rewrites a counter into its start flag while it builds; the waiters watch it change
    (a change, not a timestamp: node clocks and file-server times need not agree)."""

    def __init__(self, path: str):
        self.path, self.beats, self.stop = path, 0, threading.Event()
        _write_flag(path, "0")
        self.thread = threading.Thread(target=self._run, name="megafox-index-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.beats += 1
            with contextlib.suppress(OSError):
                _write_flag(self.path, str(self.beats))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(OSError):
            os.remove(self.path)


def rank0_first(cache_dir: str, build: Callable[[], T], what: str = "the data indices") -> T:
    """`build()` on rank 0 under `cache_lock`, then on the other ranks (which then find the cache).

    The only collective is one small broadcast before rank 0 starts (a token naming this start's
    flag files), so a build longer than the process group's timeout does not fail the run.
    Without torch.distributed, `build()` runs under the lock."""
    if not torch.distributed.is_initialized():
        with cache_lock(cache_dir):
            return build()
    rank = torch.distributed.get_rank()
    payload, heartbeat = [None, None], None
    if rank == 0:
        # the start flag exists before the broadcast, so every rank can expect to see it; the lock
        # is taken only after it (another job's build holding it must not stall this job's ranks
        # inside a collective)
        token = uuid.uuid4().hex
        try:
            os.makedirs(cache_dir, exist_ok=True)
            heartbeat = _Heartbeat(os.path.join(cache_dir, f"{FLAG_PREFIX}{token}.start"))
            payload = [token, None]
        except OSError as exc:
            payload = [None, f"data cache_dir {cache_dir}: not writable ({exc.strerror})"]
    torch.distributed.broadcast_object_list(payload, src=0)
    token, error = payload
    if error:
        raise DataError(error)
    flags = {k: os.path.join(cache_dir, f"{FLAG_PREFIX}{token}.{k}") for k in ("start", "done", "failed")}
    if rank != 0:
        _wait_for_rank0(flags, rank, what)
        return build()
    try:
        with cache_lock(cache_dir):
            result = build()
    except BaseException as exc:
        message = str(exc) if isinstance(exc, DataError) else (
            f"rank 0 failed to build {what}: {type(exc).__name__}: {str(exc)[:500]}")
        with contextlib.suppress(OSError):
            _write_flag(flags["failed"], message)
        heartbeat.close()
        raise
    _write_flag(flags["done"], "")
    heartbeat.close()  # after the done flag: a start flag gone without it means rank 0 ended mid-build
    return result


def _wait_for_rank0(flags: Dict[str, str], rank: int, what: str) -> None:
    begin = last_change = time.monotonic()
    last_beat, seen_start, next_log = None, False, begin + 600.0
    while True:
        if os.path.exists(flags["done"]):
            return
        if os.path.exists(flags["failed"]):
            with open(flags["failed"]) as f:
                raise DataError(f.read().strip() or f"rank 0 failed to build {what}")
        now = time.monotonic()
        try:
            with open(flags["start"]) as f:
                beat = f.read()
            seen_start = True
        except OSError:
            beat = None
        if beat is not None and beat != last_beat:
            last_beat, last_change = beat, now
        if not seen_start and now - begin > START_GRACE_S:
            raise DataError(f"data cache_dir {os.path.dirname(flags['start'])}: rank {rank} does not see rank 0's "
                            f"files there after {START_GRACE_S:.0f} s; cache_dir must be on a filesystem every rank sees")
        if seen_start and beat is None:
            # the start flag went away: rank 0 finished (its done/failed flag comes first; give a
            # shared filesystem a moment to show it) or ended mid-build
            time.sleep(2.0)
            if not (os.path.exists(flags["done"]) or os.path.exists(flags["failed"])):
                raise DataError(f"rank 0 stopped building {what} without finishing (no "
                                f"{os.path.basename(flags['done'])} in {os.path.dirname(flags['start'])})")
            continue
        if seen_start and now - last_change > HEARTBEAT_STALE_S:
            raise DataError(f"rank 0 stopped building {what}: its heartbeat {flags['start']} has not changed "
                            f"for {HEARTBEAT_STALE_S / 60:.0f} minutes")
        if rank == 1 and now > next_log:
            logger.warning("rank 1: still waiting for rank 0 to build %s (%.0f min so far)", what, (now - begin) / 60)
            next_log = now + 600.0
        time.sleep(min(5.0, max(0.05, (now - begin) / 20)))
