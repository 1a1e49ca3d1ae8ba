"""The preprocessing engine: input files -> shards -> one Megatron indexed dataset + manifest.

One engine for every kind of record; a codec says what a record becomes (data_prep/text_codec.py:
pretraining documents -> token ids; data_prep/chat_codec.py: chat records -> token ids + loss
masks). The engine owns everything else, the same for both:
  - the split: one shard per input file, or K contiguous groups balanced by size, big plain .jsonl
    files cut into byte ranges at line boundaries when K exceeds the files; a deterministic slice of
    the shards per SLURM array task;
  - the parallel loop: the main process reads chunks, pool workers encode them, results are written
    in input order (so the output is byte-identical for any worker count, shard count or array
    split); workers hand bulk data back through spill files, not the pipe;
  - temp-file hygiene: every file is written under a hidden temporary name and renamed when
    complete; a shard's record (.json), written last, marks it complete, and a rerun skips complete
    shards whose inputs, tokenizer and settings are unchanged; an interrupted run leaves no temporary;
  - the merge: under the output's lock (which also clears what a killed merge left), the shards'
    datasets are concatenated in input order, then the manifest, written last, marks it complete.
"""

from __future__ import annotations

import argparse
import collections
import glob as globmod
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from megafox.runtime.fs import atomic_write_json

from .common import (DataPrepError, check_output_dir, detect_format, file_stat, log, os_error_reason, output_lock,
                     read_json, tmp_name)
from .indexed import choose_dtype, merge_prefixes
from .readers import FileReader
from .tokenizer import load_tokenizer
from megafox.formats.dtypes import dtype_name
from megafox.formats.indexed import write_idx
from megafox.formats.tokenizer import tokenizer_info

MAX_EXAMPLES = 20  # skipped-record samples (file:line) kept in a shard record
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass
class RunOptions:
    """What every preprocessing run takes; a codec's options add their own fields."""
    inputs: List[str]
    tokenizer: str
    output_prefix: str
    _: KW_ONLY
    workers: int = 1
    dtype: str = "auto"
    fmt: str = "auto"
    shards: Optional[int] = None
    array_index: Optional[int] = None
    array_count: Optional[int] = None
    keep_shards: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: str = "auto"
    log_interval: float = 30.0
    quiet: bool = False

    def __post_init__(self):
        self.output_prefix = os.path.abspath(self.output_prefix)
        self.workers = max(1, int(self.workers))


class Layout(NamedTuple):
    """The files of one output beside PREFIX.bin/.idx (token ids) and PREFIX.manifest.json."""
    datasets: Tuple[Tuple[str, str], ...] = ()  # more indexed datasets, one element per token: (suffix, dtype)
    side_files: Tuple[str, ...] = ()  # text files written per shard, concatenated in shard order


class Codec(NamedTuple):
    """What the parallel loop runs for one kind of record."""
    init: Callable  # init(*init_args) in each pool worker (in this process when there is no pool)
    init_args: tuple
    encode: Callable  # chunk -> result, in this process
    encode_spill: Callable  # chunk -> result, in a pool worker (bulk data through spill_result)
    reader: Callable  # (piece, fmt, chunk_bytes) -> FileReader
    writer: Callable  # (shard, dtype) -> ShardWriter; a result starts (tokens, lengths, skips, text bytes)


# ---------------------------------------------------------------------------------------
# Worker side

_SPILL: Dict[str, object] = {"dir": None, "n": 0}


def _pool_worker_init(spill_dir: str, init: Callable, *args) -> None:
    """Ctrl-C reaches the whole process group: workers ignore it and the parent, which owns the
    output, stops them (otherwise every worker prints its own KeyboardInterrupt traceback).
    SIGTERM is how the parent's pool.terminate() stops a worker: a worker inherits the signal mask of
    whatever started the run (a launcher holding its stop signals, a test runner), and one that
    held SIGTERM would never stop, leaving the parent waiting for it forever on a failed run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # SIGINT: held by the fork
    _SPILL.update(dir=spill_dir, n=0)
    init(*args)


def spill_result(result: tuple, bulk: Sequence[int] = (0,)) -> tuple:
    """A pool worker's result with its bulk elements (token bytes, masks) moved to spill files of
    their own, (path, size) in their place: no token data crosses the pipe. The main process copies
    and deletes them (write_payload), so spill space stays at the chunks in flight."""
    out = list(result)
    for i in bulk:
        _SPILL["n"] += 1
        path = os.path.join(_SPILL["dir"], f".worker{os.getpid()}-{_SPILL['n']}.spill.tmp")
        with open(path, "wb") as f:
            f.write(out[i])
        out[i] = (path, len(out[i]))
    return tuple(out)


def write_payload(payload, out) -> None:
    """Append a result's bulk element to `out`: bytes, or a spill file (path, size), which is removed."""
    if not isinstance(payload, tuple):
        out.write(payload)
        return
    path, n = payload
    fd = os.open(path, os.O_RDONLY)
    try:
        out.flush()
        dst, off = out.fileno(), 0
        while off < n:
            try:
                k = os.copy_file_range(fd, dst, n - off, off)
            except OSError:
                k = 0
            if k <= 0:  # not supported here: plain copy
                out.write(os.pread(fd, n - off, off))
                out.flush()
                break
            off += k
    finally:
        os.close(fd)
    os.unlink(path)


def _spill_dir(output_prefix: str) -> str:
    """A private directory for this run's worker spill files; stale ones of dead local runs are removed."""
    base = output_prefix + ".shards"
    host = socket.gethostname().replace("-", "_")
    for d in globmod.glob(os.path.join(globmod.escape(base), f".spill-{globmod.escape(host)}-*")):
        try:
            pid = int(d.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            pass
    d = os.path.join(base, f".spill-{host}-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    return d


def _close_spills(spill_dir: Optional[str]) -> None:
    if spill_dir:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _final_name(e: OSError, final: str) -> str:
    """The file to name in an error: e's own, unless it is one of our hidden temporaries (a user
    knows the final name, and the temporary is gone by the time they read the message)."""
    name = e.filename if isinstance(e.filename, str) else None
    return name if name and not os.path.basename(name).startswith(".") else final


class _Done:
    def __init__(self, value):
        self.value = value

    def ready(self):
        return True

    def get(self):
        return self.value


# ---------------------------------------------------------------------------------------
# Progress


class Progress:
    """tqdm bar on a terminal; otherwise quiet key=value log lines every `interval` seconds."""

    def __init__(self, total_bytes: int, label: str, mode: str = "auto", interval: float = 30.0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.label, self.interval = mode, label, interval
        self.total = total_bytes
        self.bytes = self.docs = self.tokens = 0
        self.t0 = self.t_last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm  # late: only a terminal shows a bar; batch jobs skip its import

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, dynamic_ncols=True,
                            smoothing=0.1)

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bar is not None:
            self.bar.update(n)

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.mode == "bar" and now - self.t_last > 0.5:
            self.t_last = now
            el = max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(f"docs={self.docs:,} tok/s={self.tokens / el:,.0f}", refresh=False)
        elif self.mode == "log" and now - self.t_last >= self.interval:
            self.t_last = now
            el = max(now - self.t0, 1e-9)
            rate = self.bytes / el
            eta = (self.total - self.bytes) / rate if rate > 0 else 0.0
            log.info("progress %s docs=%d tokens=%d tok/s=%.0f MB/s=%.2f read=%.1f%% eta_s=%.0f",
                     self.label, self.docs, self.tokens, self.tokens / el, rate / 1e6,
                     100.0 * self.bytes / max(self.total, 1), eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------
# Shards


class Piece(NamedTuple):
    """One unit of input: a whole file, or a byte range [start, end) of an uncompressed JSONL file."""
    path: str
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file

    @property
    def is_range(self) -> bool:
        return self.start > 0 or self.end is not None

    def size(self) -> int:
        end = os.path.getsize(self.path) if self.end is None else self.end
        return max(end - self.start, 0)


def splittable(path: str, fmt: str) -> bool:
    """Only plain JSONL can be cut at a byte offset: a reader can find the next line from there."""
    return fmt == "jsonl" and not path.lower().endswith((".gz", ".zst"))


def plan_pieces(files: List[str], fmts: Dict[str, str], k: Optional[int]) -> List[Piece]:
    """Whole files, except that with k > len(files) large plain-JSONL files are cut into byte
    ranges of about total/k bytes, so a few huge files still make k shards (array tasks)."""
    if not k or k <= len(files):
        return [Piece(f) for f in files]
    sizes = [os.path.getsize(f) for f in files]
    target = max(sum(sizes) / k, 1.0)
    pieces: List[Piece] = []
    for f, size in zip(files, sizes):
        n = int(round(size / target)) if splittable(f, fmts[f]) else 1
        if n <= 1:
            pieces.append(Piece(f))
            continue
        bounds = [i * size // n for i in range(n)] + [size]
        pieces.extend(Piece(f, bounds[i], None if i == n - 1 else bounds[i + 1]) for i in range(n))
    return pieces


def group_pieces(pieces: List[Piece], k: Optional[int]) -> List[List[Piece]]:
    """One shard per piece by default, else k contiguous groups balanced by size."""
    if not k or k >= len(pieces):
        return [[p] for p in pieces]
    sizes = [max(p.size(), 1) for p in pieces]
    total = float(sum(sizes))
    groups: List[List[Piece]] = [[] for _ in range(k)]
    acc, prev, n = 0.0, 0, len(pieces)
    for i, (f, sz) in enumerate(zip(pieces, sizes)):
        g = min(int(acc / total * k), k - 1)
        g = max(g, prev, k - (n - i))  # monotone; leave a piece for every later group
        g = min(g, prev + 1 if groups[prev] else prev)  # no empty group in between
        groups[g].append(f)
        prev = g
        acc += sz
    return [g for g in groups if g]


def array_slice(n: int, index: int, count: int) -> range:
    return range(index * n // count, (index + 1) * n // count)


def datasets_complete(prefix: str, record: dict, layout: Layout) -> bool:
    """PREFIX's indexed datasets all exist, their .bin the size `record` (a shard's record or a
    manifest: "tokens", "dtype") gives."""
    want = [(prefix, record["dtype"])] + [(prefix + sfx, dt) for sfx, dt in layout.datasets]
    return all(os.path.exists(p + ".idx") and os.path.exists(p + ".bin")
               and os.path.getsize(p + ".bin") == record["tokens"] * np.dtype(dt).itemsize for p, dt in want)


class Shard:
    def __init__(self, index: int, pieces: List[Piece], output_prefix: str, sig_common: dict,
                 fmts: Dict[str, str], layout: Layout = Layout()):
        self.index = index
        self.pieces = pieces
        self.prefix = os.path.join(output_prefix + ".shards", f"shard-{index:05d}")
        files = []
        for p in pieces:
            st = file_stat(p.path)
            files.append([p.path, st["size"], st["mtime_ns"]] + ([p.start, p.end] if p.is_range else []))
        self.signature = dict(sig_common, files=files)
        self.fmts = fmts
        self.layout = layout

    def meta_path(self) -> str:
        return self.prefix + ".json"

    def is_complete(self) -> bool:
        try:
            meta = read_json(self.meta_path())
        except (OSError, ValueError):
            return False
        if meta.get("signature") != self.signature:
            return False
        return (datasets_complete(self.prefix, meta, self.layout)
                and all(os.path.exists(self.prefix + sfx) for sfx in self.layout.side_files))

    def clean_stale(self) -> None:
        d, b = os.path.split(self.prefix)
        for p in globmod.glob(os.path.join(globmod.escape(d), "." + globmod.escape(b) + ".*.tmp*")):
            try:
                os.unlink(p)
            except OSError:
                pass


class IndexedWriter:
    """One indexed dataset being written: .bin streamed to a temporary, .idx written at the end."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, dtype
        self.bin_tmp, self.idx_tmp = tmp_name(prefix + ".bin"), tmp_name(prefix + ".idx")
        self.f = open(self.bin_tmp, "wb")

    def write(self, payload) -> None:
        write_payload(payload, self.f)

    def finish(self, lengths: np.ndarray) -> None:
        self.f.close()
        write_idx(self.idx_tmp, lengths, self.dtype)
        os.replace(self.idx_tmp, self.prefix + ".idx")  # a .bin under its final name always
        os.replace(self.bin_tmp, self.prefix + ".bin")  # has its matching .idx

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            for p in (self.bin_tmp, self.idx_tmp):
                if os.path.exists(p):
                    os.unlink(p)


class ShardWriter:
    """Writes one shard: the token dataset, the layout's other datasets and side files, then the
    shard's record. add() takes a result (tokens, int32 lengths, [(skip reason, line)], text bytes);
    a codec's writer adds what its longer results carry."""

    def __init__(self, shard: Shard, dtype):
        self.shard = shard
        self.dtype = dtype
        os.makedirs(os.path.dirname(shard.prefix), exist_ok=True)
        shard.clean_stale()
        self.tokens_out = IndexedWriter(shard.prefix, dtype)
        self.datasets = [IndexedWriter(shard.prefix + sfx, dt) for sfx, dt in shard.layout.datasets]
        self.side_tmp = {sfx: tmp_name(shard.prefix + sfx) for sfx in shard.layout.side_files}
        self.side = {sfx: open(p, "w", encoding="utf-8") for sfx, p in self.side_tmp.items()}
        self.lengths: List[np.ndarray] = []
        self.skipped: collections.Counter = collections.Counter()
        self.examples: List[dict] = []
        self.inputs: List[dict] = []
        self.docs = self.tokens = self.text_bytes = 0
        self.t0 = time.monotonic()

    def skip(self, reason: str, piece: Piece, line: int, count: int = 1) -> None:
        self.skipped[reason] += count
        if len(self.examples) < MAX_EXAMPLES:
            example = {"reason": reason, "file": piece.path, "line": line}
            if piece.start:
                # line 1 starts at that byte: no task reads the whole file to count lines before it
                example["from_byte"] = piece.start
            self.examples.append(example)

    def add(self, piece: Piece, result) -> tuple:
        tok, lens, skips, nbytes = result
        self.tokens_out.write(tok)
        lengths = np.frombuffer(lens, dtype=np.int32)
        self.lengths.append(lengths)
        n, t = len(lengths), int(lengths.sum(dtype=np.int64))
        self.docs += n
        self.tokens += t
        self.text_bytes += nbytes
        for reason, line in skips:
            self.skip(reason, piece, line)
        return n, t

    def file_done(self, piece: Piece, reader: FileReader) -> None:
        st = file_stat(piece.path)
        entry = {"path": piece.path, "size": st["size"], "sha256": reader.sha.hexdigest()}
        if piece.is_range:  # lines read from [start, range_end); sha256 of those bytes
            entry["range"] = [reader.range_start, reader.range_end]
        self.inputs.append(entry)

    def finish(self) -> dict:
        for sfx, f in self.side.items():
            f.close()
            os.replace(self.side_tmp[sfx], self.shard.prefix + sfx)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        for w in self.datasets:
            w.finish(lengths)
        self.tokens_out.finish(lengths)
        meta = {
            "signature": self.shard.signature,
            "dtype": dtype_name(self.dtype),
            "inputs": self.inputs,
            "documents": self.docs,
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": self.examples,
            "elapsed_s": round(time.monotonic() - self.t0, 3),
            **self.extra_meta(),
        }
        atomic_write_json(self.shard.meta_path(), meta)  # written last: marks the shard complete
        return meta

    def extra_meta(self) -> dict:
        """More fields for the shard's record (a codec's own counts)."""
        return {}

    def abort(self) -> None:
        try:
            for f in self.side.values():
                f.close()
            for p in self.side_tmp.values():
                if os.path.exists(p):
                    os.unlink(p)
            for w in self.datasets:
                w.abort()
        finally:
            self.tokens_out.abort()


# ---------------------------------------------------------------------------------------
# A run


class Run:
    """One output prefix made from its inputs. A codec's run (a subclass) says how records are
    checked, encoded and counted; run() does the rest."""

    noun = "documents"  # what the messages count
    layout = Layout()

    def __init__(self, opts: RunOptions):
        self.opts = opts

    # -- what a codec says ---------------------------------------------------------------
    def prepare(self, sp, tok: dict, dtype) -> None:
        """Check the codec's settings against the tokenizer (DataPrepError naming what is wrong)."""

    def check_input(self, path: str, fmt: str) -> None:
        """Refuse an input file whose format the codec cannot read."""

    def signature(self) -> dict:
        """What the output depends on besides the inputs: a shard whose record differs is redone."""
        raise NotImplementedError

    def codec(self) -> Codec:
        raise NotImplementedError

    def manifest(self, metas: List[dict], elapsed: float) -> dict:
        raise NotImplementedError

    def print_summary(self, man: dict) -> None:
        raise NotImplementedError

    # -- the engine ----------------------------------------------------------------------
    def setup(self) -> None:
        opts = self.opts
        sp = load_tokenizer(opts.tokenizer)
        self.tok = tokenizer_info(sp, opts.tokenizer)
        self.dtype = choose_dtype(opts.dtype, self.tok["vocab_size"])
        self.prepare(sp, self.tok, self.dtype)
        fmts = {}
        for f in opts.inputs:
            fmts[f] = detect_format(f, opts.fmt)
            self.check_input(f, fmts[f])
        sig_common = self.signature()
        groups = group_pieces(plan_pieces(opts.inputs, fmts, opts.shards), opts.shards)
        self.shards = [Shard(i, g, opts.output_prefix, sig_common, fmts, self.layout) for i, g in enumerate(groups)]
        self.sig = dict(sig_common, shards=[s.signature["files"] for s in self.shards])

    def run(self, merge_only: bool = False) -> dict:
        """Run (a slice of) the preprocessing; returns the manifest (or an array task's stats)."""
        t0 = time.monotonic()
        opts = self.opts
        check_output_dir(opts.output_prefix)
        self.setup()
        label = opts.output_prefix
        # also for array tasks: a resubmitted job must not redo sources merged by an earlier one
        man = self.up_to_date()
        if man is not None:
            if not opts.quiet:
                print(f"{label}: up to date ({man['documents']} {self.noun}, {man['tokens']} tokens)", flush=True)
            return man
        if opts.array_count is not None:
            if opts.array_index is None or not (0 <= opts.array_index < opts.array_count):
                raise DataPrepError(f"--array-index must be in [0, {opts.array_count})")
            mine = [self.shards[i] for i in array_slice(len(self.shards), opts.array_index, opts.array_count)]
            stats = self.process(mine) if mine and not merge_only else {}
            el = time.monotonic() - t0
            if not opts.quiet:
                print(f"{label}: array task {opts.array_index}/{opts.array_count}: {len(mine)} of {len(self.shards)} "
                      f"shards, {stats.get('documents', 0)} {self.noun}, {stats.get('tokens', 0)} tokens, {el:.1f}s",
                      flush=True)
            return dict(stats, shards=[s.index for s in mine], elapsed_s=el)
        if not merge_only:
            self.process(self.shards)
        man = self.finalize(t0)
        if not opts.quiet:
            self.print_summary(man)
        return man

    def up_to_date(self) -> Optional[dict]:
        """The manifest of a finished output made from these inputs and settings, else None."""
        try:
            man = read_json(self.opts.output_prefix + ".manifest.json")
        except (OSError, ValueError):
            return None
        if man.get("signature") != self.sig:
            return None
        return man if datasets_complete(self.opts.output_prefix, man, self.layout) else None

    def process(self, shards: List[Shard]) -> dict:
        """Write the shards not complete yet: chunks encoded in parallel, written in input order."""
        opts, dtype, label = self.opts, self.dtype, self.opts.output_prefix
        codec = self.codec()
        pending = [s for s in shards if not s.is_complete()]
        done_before = len(shards) - len(pending)
        if done_before and not opts.quiet:
            log.info("%s: %d of %d shards already complete, skipping them", label, done_before, len(shards))
        total = sum(p.size() for s in pending for p in s.pieces)
        stats = {"documents": 0, "tokens": 0, "bytes": total, "shards_done": 0}
        if not pending:
            return stats
        mode = "none" if opts.quiet else opts.progress
        prog = Progress(total, os.path.basename(label), mode, opts.log_interval)
        pool = None
        spill_dir = None
        nworkers = opts.workers
        if nworkers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            try:
                spill_dir = _spill_dir(opts.output_prefix)
            except OSError as e:
                raise DataPrepError(f"{e.filename or opts.output_prefix + '.shards'}: {os_error_reason(e)}") from None
            # Ctrl-C held while the workers fork: one arriving before a worker's initializer ignores it
            # would print that worker's KeyboardInterrupt traceback; the parent gets it once unblocked
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                pool = ctx.Pool(nworkers, initializer=_pool_worker_init,
                                initargs=(spill_dir, codec.init) + codec.init_args)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        else:
            codec.init(*codec.init_args)

        def produce():
            for sh in pending:
                yield ("begin", sh, None, None)
                for piece in sh.pieces:
                    reader = codec.reader(piece, sh.fmts[piece.path], opts.chunk_bytes)
                    reader.progress_cb = prog.add_bytes
                    for ch in reader.chunks():
                        # skipped records of a range are reported by line counted from its first line
                        where = piece._replace(start=reader.range_start) if piece.is_range else piece
                        yield ("chunk", sh, where, ch)
                    yield ("file_end", sh, piece, reader)
                yield ("end", sh, None, None)

        writers: Dict[int, ShardWriter] = {}
        window: collections.deque = collections.deque()
        max_inflight = 3 * nworkers if pool else 1

        def handle(item, res) -> None:
            try:
                _handle(item, res)
            except OSError as e:  # readers turn their own errors into DataPrepError: this is the write side
                sh = item[1]
                raise DataPrepError(f"{_final_name(e, sh.prefix + '.bin')}: {os_error_reason(e)} while writing "
                                    f"shard {sh.index} (finished shards are kept; rerun to continue)") from None

        def _handle(item, res) -> None:
            kind, sh, path, payload = item
            if kind == "begin":
                writers[sh.index] = codec.writer(sh, dtype)
            elif kind == "chunk":
                w = writers[sh.index]
                if payload[0] == "skip":
                    w.skip(payload[1], path, payload[2], payload[3])
                else:
                    n, t = w.add(path, res.get())
                    prog.add(n, t)
            elif kind == "file_end":
                writers[sh.index].file_done(path, payload)
            elif kind == "end":
                meta = writers[sh.index].finish()  # stays abortable until its record is written
                del writers[sh.index]
                stats["documents"] += meta["documents"]
                stats["tokens"] += meta["tokens"]
                stats["shards_done"] += 1

        try:
            for item in produce():
                res = None
                if item[0] == "chunk" and item[3][0] != "skip":
                    res = pool.apply_async(codec.encode_spill, (item[3],)) if pool else _Done(codec.encode(item[3]))
                window.append((item, res))
                while window and (len(window) > max_inflight or window[0][1] is None or window[0][1].ready()):
                    handle(*window.popleft())
            while window:
                handle(*window.popleft())
        except BaseException:
            for w in writers.values():
                w.abort()
            for sh in pending:  # a Ctrl-C can land between a writer's open() and its entry in `writers`
                sh.clean_stale()
            if pool is not None:
                pool.terminate()
                pool.join()
            _close_spills(spill_dir)
            raise
        finally:
            prog.close()
        if pool is not None:
            pool.close()
            pool.join()
        _close_spills(spill_dir)
        return stats

    def finalize(self, t0: float) -> dict:
        """Merge the finished shards into PREFIX (datasets, side files, then the manifest)."""
        shards, opts, out = self.shards, self.opts, self.opts.output_prefix
        missing = [s.index for s in shards if not s.is_complete()]
        if missing:
            raise DataPrepError(f"{out}: {len(missing)} of {len(shards)} shards are not finished "
                                f"(e.g. shard {missing[0]} under {out}.shards/); rerun them first")
        man = self.manifest([read_json(s.meta_path()) for s in shards], time.monotonic() - t0)
        datasets = self.layout.datasets + (("", self.dtype),)  # the tokens last: their .bin marks the data there
        finals = [sfx + ext for sfx, _ in datasets for ext in (".bin", ".idx")]
        # the lock also clears what a finalize killed earlier left (.PREFIX.bin.tmp<pid>, manifest temporaries)
        with output_lock(out, finals + list(self.layout.side_files) + [".manifest.json"]):
            try:
                for sfx, dt in datasets:
                    if len(shards) == 1 and not opts.keep_shards:
                        os.replace(shards[0].prefix + sfx + ".idx", out + sfx + ".idx")
                        os.replace(shards[0].prefix + sfx + ".bin", out + sfx + ".bin")
                    else:
                        merge_prefixes([s.prefix + sfx for s in shards], out + sfx, dt)
                for sfx in self.layout.side_files:
                    _concatenate([s.prefix + sfx for s in shards], out + sfx)
                man["elapsed_s"] = round(time.monotonic() - t0, 3)
                man["tokens_per_s"] = round(man["tokens"] / man["elapsed_s"], 1) if man["elapsed_s"] > 0 else None
                atomic_write_json(out + ".manifest.json", man)  # last: marks the output complete
            except OSError as e:
                raise DataPrepError(f"{_final_name(e, out + '.manifest.json')}: {os_error_reason(e)} "
                                    f"(the shards under {out}.shards/ are kept; rerun to finish)") from None
        if not opts.keep_shards:
            shutil.rmtree(out + ".shards", ignore_errors=True)
        return man


def _concatenate(parts: List[str], final: str) -> None:
    tmp = tmp_name(final)
    try:
        with open(tmp, "wb") as f:
            for p in parts:
                with open(p, "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 20)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------
# The flags every preprocessing command shares


def add_run_arguments(p: argparse.ArgumentParser, input_help: str, required: bool = True) -> None:
    """--input, --tokenizer, --output-prefix (a command's own flags follow, then add_engine_arguments')."""
    p.add_argument("--input", nargs="+", action="extend", required=required, metavar="GLOB", help=input_help)
    p.add_argument("--tokenizer", required=required, metavar="MODEL",
                   help="SentencePiece .model file (or a dir with tokenizer.model)")
    p.add_argument("--output-prefix", required=required, metavar="PREFIX")


def add_engine_arguments(p: argparse.ArgumentParser, formats: Sequence[str], format_help: Optional[str]) -> None:
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"])
    p.add_argument("--format", default="auto", choices=formats, help=format_help)
    p.add_argument("--shards", type=int, default=None, metavar="K",
                   help="group the inputs into K shards (default: one shard per input file); with K > files, "
                        "large plain .jsonl files are cut into byte ranges at line boundaries")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--array-index", type=int, default=None, help="this task's index (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--array-count", type=int, default=None, help="number of tasks (SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--merge", action="store_true", help="only merge finished shards into PREFIX + manifest")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20),
                   help="text per work item sent to a worker (MiB)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"])
    p.add_argument("--log-interval", type=float, default=30.0, help="seconds between log lines when not a TTY")
    p.add_argument("--quiet", action="store_true")


def run_options(a: argparse.Namespace) -> dict:
    """add_engine_arguments' flags, checked, as RunOptions keywords."""
    if (a.array_index is None) != (a.array_count is None) and not a.merge:
        raise DataPrepError("--array-index and --array-count go together")
    if a.array_count is not None and a.array_count < 1:
        raise DataPrepError("--array-count must be >= 1")
    if a.shards is not None and a.shards < 1:
        raise DataPrepError("--shards must be >= 1")
    return dict(workers=a.workers, dtype=a.dtype, fmt=a.format, shards=a.shards, array_index=a.array_index,
                array_count=None if a.merge else a.array_count, keep_shards=a.keep_shards,
                chunk_bytes=max(1024, int(a.chunk_mb * (1 << 20))), progress=a.progress,
                log_interval=a.log_interval, quiet=a.quiet)
