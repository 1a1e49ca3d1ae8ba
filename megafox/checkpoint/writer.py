"""Writing a checkpoint's shards in a background thread of the training process.

megatron-core's asynchronous save (`dist_checkpointing.save(..., async_sharded_save=True)`)
returns an AsyncRequest: the planning and the copy of every tensor to host memory are done,
what is left is writing the files and then, on every rank, finalizing (DCP's `.metadata` from all
ranks' write results, `metadata.json`). Its AsyncCallsQueue runs the writing in a forked copy of
the training process, which forks again per file. On a GPU node that is cheap; a forked copy of a
process whose weights live in host memory, though, duplicates every page the training loop
touches while the copy lives (copy-on-write), i.e. the whole model, gradients and optimizer state
per save on a CPU rank. So here the same request is run by `ThreadAsyncCaller`, an AsyncCaller
for megatron-core's AsyncCallsQueue (which keeps its rank-synchronous finalization), whose
writer threads run megatron-core's own per-file writer and then digest each file they wrote
(megafox.checkpoint.integrity) while it is still in the page cache.

The staged copies the request holds are the only extra memory; writing needs no collectives, so
the training loop runs on while the threads write.
"""
from __future__ import annotations

import inspect
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from megafox.checkpoint.integrity import digest

# megatron-core's per-file writer without its `_disable_gc` decorator: it runs in a thread of the
# training process here, where turning the collector off would affect the training loop too.
_write_one_file = inspect.unwrap(FileSystemWriterAsync.write_preloaded_data)


class WriteDigests:
    """What the writer threads of one save wrote: {file name: digest}, filled as files complete."""

    def __init__(self):
        self.files: Dict[str, Dict[str, object]] = {}
        self._lock = threading.Lock()

    def add(self, path: Path) -> None:
        d = digest(path)
        with self._lock:
            self.files[path.name] = d


def _nice_this_thread() -> None:
    """The lowest CPU priority for the calling thread (Linux nice values are per thread, and the
    threads it starts inherit it): a background writer takes the cores the training loop leaves
    idle instead of time slices from it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def threaded_writer(digests: WriteDigests, background: bool) -> Callable[..., None]:
    """A drop-in for FileSystemWriterAsync.write_preloaded_data_multiproc (same arguments and
    result protocol) that writes each file in a thread and digests it once written; `background`:
    at the lowest CPU priority (while training goes on)."""

    def write(transform_list: List[Any], use_msc: bool, rank: int, write_buckets: List[Any],
              global_results_queue: Any) -> None:
        if background:
            _nice_this_thread()
        local_results: "queue.Queue" = queue.Queue()
        count = queue.Queue()  # megatron's writer marks completion with get() + task_done()
        threads = []
        for i, bucket in enumerate(write_buckets):
            count.put(i)
            threads.append(threading.Thread(
                target=_write_one_file, args=(transform_list, i, bucket, local_results, count, True),
                name=f"megafox-ckpt-write-{i}", daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results: Any = {}
        for _ in write_buckets:
            index, result = local_results.get_nowait()
            if isinstance(result, BaseException):
                results = result
                break
            results[index] = result
        if not isinstance(results, BaseException):
            try:
                for file_name, _, _ in write_buckets:
                    digests.add(Path(file_name))
            except OSError as exc:
                results = exc
        global_results_queue.put(results)

    return write


class ThreadAsyncCaller(AsyncCaller):
    """Runs an AsyncRequest's write function in a daemon thread (see the module docstring)."""

    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        if async_req.async_fn is None:
            return
        args = list(async_req.async_fn_args)
        if async_req.preload_fn:
            args[1] = async_req.preload_fn()  # device -> host copies of tensors not yet on the host

        def run():
            try:
                async_req.async_fn(*args, **async_req.async_fn_kwargs)
            except BaseException as exc:  # reported through the results queue by the writer itself
                self.failure = exc

        self.thread = threading.Thread(target=run, name="megafox-ckpt-writer", daemon=True)
        self.thread.start()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        alive = int(self.thread is not None and self.thread.is_alive())
        done = not alive if no_dist else self.sync_all_async_calls(alive)
        if done or blocking:
            self.close()
            done = True
        return done

    def close(self, abort: bool = False) -> None:
        if self.thread is not None and not abort:
            self.thread.join()
        self.thread = None

    def __del__(self):
        pass


class ThreadCallsQueue(AsyncCallsQueue):
    """megatron-core's AsyncCallsQueue with writer threads instead of forked processes."""

    def __init__(self):
        super().__init__(persistent=False)

    def _get_async_caller(self):
        return ThreadAsyncCaller()

    def writing(self) -> bool:
        """Whether this rank's writer threads are still running (local; no collective)."""
        return any(c.async_caller.thread is not None and c.async_caller.thread.is_alive() for c in self.async_calls)


def in_threads(request: AsyncRequest, digests: WriteDigests, background: bool = False) -> AsyncRequest:
    """`request` (from dist_checkpointing.save(async_sharded_save=True)) with its forking writer
    replaced by `threaded_writer`; the writer's own arguments are kept."""
    if request.async_fn is None:
        return request
    fn = request.async_fn
    bound = getattr(fn, "args", ())  # functools.partial(write_preloaded_data_multiproc, transforms, use_msc)
    if getattr(getattr(fn, "func", None), "__name__", "") != "write_preloaded_data_multiproc" or len(bound) != 2:
        raise RuntimeError(f"unexpected megatron-core writer {fn!r}; megafox.checkpoint.writer needs review")
    import functools

    return request._replace(async_fn=functools.partial(threaded_writer(digests, background), *bound))
