"""Tokenize documents into Megatron's indexed format (PREFIX.bin + PREFIX.idx + PREFIX.manifest.json).

    python -m data_prep.preprocess --input GLOB [GLOB ...] --tokenizer MODEL --output-prefix PREFIX
        [--json-key text] [--workers N] [--append-eod | --no-append-eod] [--dtype auto|uint16|int32]
        [--format auto|jsonl|parquet|text] [--shards K] [--keep-shards]
        [--array-index I --array-count N]   # one deterministic slice of the shards (SLURM array task)
        [--merge]                           # merge finished shards into PREFIX (the finalize job)

Work is split into shards: one per input file by default, or K contiguous groups of files
(balanced by size) with --shards K; with K larger than the number of files, big plain .jsonl
files are cut into byte ranges at line boundaries, so even one huge file spreads over K array tasks.  Each shard is written under PREFIX.shards/ to temporary
names and renamed when complete; a rerun skips shards that are complete and whose inputs,
tokenizer and options are unchanged.  The final PREFIX.bin/.idx is the concatenation of the
shards in input order, so it is byte-identical whatever --workers, --shards or array split.
"""

from __future__ import annotations

import argparse
import collections
import glob as globmod
import os
import shutil
import signal
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

from megafox.runtime.fs import atomic_write_json

from .common import (FORMATS, DataPrepError, check_output_dir, detect_format, expand_inputs, file_stat,
                     human_bytes, log, os_error_reason, output_lock, read_json, run_main, setup_logging, tmp_name)
from .indexed import choose_dtype, merge_prefixes
from .readers import FileReader, parse_chunk, INVALID_UTF8, EMPTY
from .tokenizer import load_tokenizer
from megafox.formats.dtypes import dtype_name
from megafox.formats.indexed import write_idx
from megafox.formats.tokenizer import tokenizer_info

MANIFEST_VERSION = 1
MAX_EXAMPLES = 20
DEFAULT_CHUNK_BYTES = 1 << 20

# ---------------------------------------------------------------------------------------
# Worker side

_W: Dict[str, object] = {}


def _pool_worker_init(init: Callable, *args) -> None:
    """Ctrl-C reaches the whole process group: workers ignore it and the parent, which owns the
    output, stops them (otherwise every worker prints its own KeyboardInterrupt traceback).
    SIGTERM is how the parent's pool.terminate() stops a worker: a worker inherits the signal mask of
    whatever started the run (a launcher holding its stop signals, a test runner), and one that
    held SIGTERM would never stop, leaving the parent waiting for it forever on a failed run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    init(*args)


def _worker_init(model_path: str, json_key: str, eos: Optional[int], dtype: str,
                 spill_dir: Optional[str] = None) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(model_path)
    _W.update(sp=sp, key=json_key, eos=eos, dtype=np.dtype(dtype), spill=spill_dir, spilled=0)


def _encode_spill(chunk: tuple):
    """Pool workers write a chunk's token bytes to a spill file of its own and send back only
    (path, size): no token data crosses the pipe. The main process copies and deletes it, so
    spill space stays at the chunks in flight, not a second copy of the output."""
    return spill_result(_encode_chunk(chunk))


def spill_result(result: tuple) -> tuple:
    """A worker's result with its token bytes (the first element) moved to a spill file."""
    tok = result[0]
    _W["spilled"] += 1
    path = os.path.join(_W["spill"], f".worker{os.getpid()}-{_W['spilled']}.spill.tmp")
    with open(path, "wb") as f:
        f.write(tok)
    return ((path, len(tok)),) + tuple(result[1:])


def _encode_chunk(chunk: tuple):
    """chunk -> (token bytes, int32 lengths bytes, skips, text bytes).  Only bytes cross processes."""
    return encode_texts(*parse_chunk(chunk, _W["key"]))


def encode_texts(texts: List[str], lines: List[int], skips: list):
    """Parsed documents -> _encode_chunk's result (also data_prep.dedup's, after it drops some)."""
    sp = _W["sp"]
    nbytes_text = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    try:
        arrs = sp.encode(texts, return_type="numpy", num_threads=1) if texts else []
    except Exception:  # e.g. lone surrogates from JSON escapes: isolate the bad documents
        arrs, kept = [], []
        for t, ln in zip(texts, lines):
            try:
                arrs.append(sp.encode([t], return_type="numpy", num_threads=1)[0])
                kept.append(ln)
            except Exception:
                skips.append((INVALID_UTF8, ln))
        lines = kept
        skips.sort(key=lambda s: s[1])
    eos = _W["eos"]
    if any(len(a) == 0 for a in arrs):  # nothing to train on (possible only without eos)
        skips.extend((EMPTY, ln) for a, ln in zip(arrs, lines) if len(a) == 0)
        skips.sort(key=lambda s: s[1])
        arrs = [a for a in arrs if len(a)]
    n = len(arrs)
    lengths = np.fromiter((len(a) for a in arrs), dtype=np.int32, count=n)
    if eos is not None and n:
        lengths += 1
        e = np.array([eos], dtype=np.int32)
        parts = []
        for a in arrs:
            parts.append(a)
            parts.append(e)
    else:
        parts = arrs
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return flat.astype(_W["dtype"], copy=False).tobytes(), lengths.tobytes(), skips, nbytes_text


def _copy_spill(ref: tuple, out) -> None:
    path, n = ref
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


def _spill_dir(opts: "Options") -> str:
    """A private directory for this run's worker spill files; stale ones of dead local runs are removed."""
    import socket

    base = opts.output_prefix + ".shards"
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


def _final_name(e: OSError, final: str) -> str:
    """The file to name in an error: e's own, unless it is one of our hidden temporaries (a user
    knows the final name, and the temporary is gone by the time they read the message)."""
    name = e.filename if isinstance(e.filename, str) else None
    return name if name and not os.path.basename(name).startswith(".") else final


def _close_spills(spill_dir: Optional[str]) -> None:
    if spill_dir:
        shutil.rmtree(spill_dir, ignore_errors=True)


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
            from tqdm import tqdm

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


class Options:
    def __init__(self, inputs, tokenizer, output_prefix, json_key="text", workers=1, append_eod=True,
                 dtype="auto", fmt="auto", shards=None, array_index=None, array_count=None,
                 keep_shards=False, chunk_bytes=DEFAULT_CHUNK_BYTES, progress="auto", log_interval=30.0,
                 quiet=False, drop_filter=None):
        self.inputs = inputs
        self.tokenizer = tokenizer
        self.output_prefix = os.path.abspath(output_prefix)
        self.json_key = json_key
        self.workers = max(1, int(workers))
        self.append_eod = append_eod
        self.dtype = dtype
        self.fmt = fmt
        self.shards = shards
        self.array_index = array_index
        self.array_count = array_count
        self.keep_shards = keep_shards
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.log_interval = log_interval
        self.quiet = quiet
        self.drop_filter = drop_filter  # data_prep.dedup.DropFilter: documents the stage's dedup removes


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


class Shard:
    def __init__(self, index: int, pieces: List[Piece], opts: Options, sig_common: dict, fmts: Dict[str, str]):
        self.index = index
        self.pieces = pieces
        self.prefix = os.path.join(opts.output_prefix + ".shards", f"shard-{index:05d}")
        files = []
        for p in pieces:
            st = file_stat(p.path)
            files.append([p.path, st["size"], st["mtime_ns"]] + ([p.start, p.end] if p.is_range else []))
        self.signature = dict(sig_common, files=files)
        self.fmts = fmts

    def meta_path(self) -> str:
        return self.prefix + ".json"

    def is_complete(self) -> bool:
        try:
            meta = read_json(self.meta_path())
        except (OSError, ValueError):
            return False
        if meta.get("signature") != self.signature:
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        return (os.path.exists(self.prefix + ".idx") and os.path.exists(self.prefix + ".bin")
                and os.path.getsize(self.prefix + ".bin") == meta["tokens"] * itemsize)

    def clean_stale(self) -> None:
        d, b = os.path.split(self.prefix)
        for p in globmod.glob(os.path.join(globmod.escape(d), "." + globmod.escape(b) + ".*.tmp*")):
            try:
                os.unlink(p)
            except OSError:
                pass


class ShardWriter:
    def __init__(self, shard: Shard, dtype):
        self.shard = shard
        self.dtype = dtype
        os.makedirs(os.path.dirname(shard.prefix), exist_ok=True)
        shard.clean_stale()
        self.bin_tmp = tmp_name(shard.prefix + ".bin")
        self.idx_tmp = tmp_name(shard.prefix + ".idx")
        self.f = open(self.bin_tmp, "wb")
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
        if isinstance(tok, tuple):  # (spill file, size) written by a pool worker
            _copy_spill(tok, self.f)
        else:
            self.f.write(tok)
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
        self.f.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        write_idx(self.idx_tmp, lengths, self.dtype)
        os.replace(self.idx_tmp, self.shard.prefix + ".idx")  # a .bin under its final name always
        os.replace(self.bin_tmp, self.shard.prefix + ".bin")  # has its matching .idx

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
        """More fields for the shard's record (a subclass's own counts)."""
        return {}

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            for p in (self.bin_tmp, self.idx_tmp):
                if os.path.exists(p):
                    os.unlink(p)


# ---------------------------------------------------------------------------------------
# Driver


def _setup(opts: Options):
    sp = load_tokenizer(opts.tokenizer)
    tok = tokenizer_info(sp, opts.tokenizer)
    dtype = choose_dtype(opts.dtype, tok["vocab_size"])
    eos = None
    if opts.append_eod:
        eos = tok["eos_id"]
        if eos is None or eos < 0:
            raise DataPrepError(f"tokenizer {tok['path']} has no eos id; use --no-append-eod")
    fmts = {f: detect_format(f, opts.fmt) for f in opts.inputs}
    sig_common = {"tokenizer_sha256": tok["sha256"], "json_key": opts.json_key,
                  "append_eod": bool(opts.append_eod), "dtype": dtype_name(dtype), "format": opts.fmt}
    if opts.drop_filter is not None:  # other removals: the shards are tokenized again
        sig_common["removed"] = opts.drop_filter.digest
    groups = group_pieces(plan_pieces(opts.inputs, fmts, opts.shards), opts.shards)
    shards = [Shard(i, g, opts, sig_common, fmts) for i, g in enumerate(groups)]
    return sp, tok, dtype, eos, shards, sig_common


class Codec(NamedTuple):
    """What _process runs: the plain-text codec below, or another one (data_prep.sft: chat records ->
    tokens + loss masks) that reuses the same parallel, ordered, resumable machinery."""
    init: Callable  # init(*init_args[, spill_dir]) in each worker (and here when there is no pool)
    init_args: tuple
    encode: Callable  # chunk -> result, in this process
    encode_spill: Callable  # chunk -> result, in a pool worker (bulk data through spill files)
    reader: Callable  # (piece, fmt, chunk_bytes) -> FileReader
    writer: Callable  # (shard, dtype) -> ShardWriter


def _text_codec(opts: Options, tok: dict, dtype, eos) -> Codec:
    codec = Codec(_worker_init, (tok["path"], opts.json_key, eos, dtype_name(dtype)), _encode_chunk, _encode_spill,
                  lambda piece, fmt, chunk_bytes: FileReader(piece.path, fmt, opts.json_key, chunk_bytes,
                                                             piece.start, piece.end),
                  ShardWriter)
    return opts.drop_filter.codec(codec) if opts.drop_filter is not None else codec


def _process(shards: List[Shard], opts: Options, tok: dict, dtype, eos, label: str,
             codec: Optional[Codec] = None) -> dict:
    codec = codec or _text_codec(opts, tok, dtype, eos)
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
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        try:
            spill_dir = _spill_dir(opts)
        except OSError as e:
            raise DataPrepError(f"{e.filename or opts.output_prefix + '.shards'}: {os_error_reason(e)}") from None
        pool = ctx.Pool(nworkers, initializer=_pool_worker_init,
                        initargs=(codec.init,) + codec.init_args + (spill_dir,))
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
            raise DataPrepError(f"{_final_name(e, sh.prefix + '.bin')}: {os_error_reason(e)} while writing shard "
                                f"{sh.index} (finished shards are kept; rerun to continue)") from None

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


def _manifest(shards: List[Shard], opts: Options, tok: dict, dtype, elapsed: float, sig: dict) -> dict:
    metas = [read_json(s.meta_path()) for s in shards]
    skipped: collections.Counter = collections.Counter()
    examples: List[dict] = []
    for m in metas:
        skipped.update(m["skipped"])
        examples.extend(m["skipped_examples"][: MAX_EXAMPLES - len(examples)])
    docs = sum(m["documents"] for m in metas)
    tokens = sum(m["tokens"] for m in metas)
    removed: collections.Counter = collections.Counter()  # by the stage's dedup / decontamination
    for m in metas:
        removed.update(m.get("removed", {}))
    extra = {"removed": dict(sorted(removed.items()))} if any("removed" in m for m in metas) else {}
    return {
        "version": MANIFEST_VERSION,
        "prefix": opts.output_prefix,
        "inputs": [i for m in metas for i in m["inputs"]],
        "tokenizer": tok,
        "dtype": dtype_name(dtype),
        "json_key": opts.json_key,
        "append_eod": bool(opts.append_eod),
        "documents": docs,
        "tokens": tokens,
        "text_bytes": sum(m.get("text_bytes", 0) for m in metas),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": int(sum(skipped.values())),
        "skipped_examples": examples,
        "shards": len(shards),
        "shard_prefixes": [s.prefix for s in shards] if opts.keep_shards else [],
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "signature": sig,
        **extra,
    }


def _finalize(shards: List[Shard], opts: Options, tok: dict, dtype, t0: float, sig: dict) -> dict:
    missing = [s.index for s in shards if not s.is_complete()]
    if missing:
        raise DataPrepError(f"{opts.output_prefix}: {len(missing)} of {len(shards)} shards are not finished "
                            f"(e.g. shard {missing[0]} under {opts.output_prefix}.shards/); rerun them first")
    man = _manifest(shards, opts, tok, dtype, time.monotonic() - t0, sig)
    out = opts.output_prefix
    # the lock also clears what a finalize killed earlier left (.PREFIX.bin.tmp<pid>, manifest temporaries)
    with output_lock(out, (".bin", ".idx", ".manifest.json")):
        try:
            if len(shards) == 1 and not opts.keep_shards:
                os.replace(shards[0].prefix + ".bin", out + ".bin")
                os.replace(shards[0].prefix + ".idx", out + ".idx")
            else:
                merge_prefixes([s.prefix for s in shards], out, dtype)
            man["elapsed_s"] = round(time.monotonic() - t0, 3)
            man["tokens_per_s"] = round(man["tokens"] / man["elapsed_s"], 1) if man["elapsed_s"] > 0 else None
            atomic_write_json(out + ".manifest.json", man)  # last: marks the output complete
        except OSError as e:
            raise DataPrepError(f"{_final_name(e, out + '.manifest.json')}: {os_error_reason(e)} "
                                f"(the shards under {out}.shards/ are kept; rerun to finish)") from None
    if not opts.keep_shards:
        shutil.rmtree(opts.output_prefix + ".shards", ignore_errors=True)
    return man


def _overall_signature(shards: List[Shard], sig_common: dict) -> dict:
    return dict(sig_common, shards=[s.signature["files"] for s in shards])


def _up_to_date(opts: Options, sig: dict) -> Optional[dict]:
    p = opts.output_prefix + ".manifest.json"
    try:
        man = read_json(p)
    except (OSError, ValueError):
        return None
    if man.get("signature") != sig:
        return None
    itemsize = np.dtype(man["dtype"]).itemsize
    b = opts.output_prefix + ".bin"
    if not (os.path.exists(b) and os.path.exists(opts.output_prefix + ".idx")
            and os.path.getsize(b) == man["tokens"] * itemsize):
        return None
    return man


def preprocess(opts: Options, merge_only: bool = False) -> dict:
    """Run (a slice of) the preprocessing; returns the manifest (or the slice's stats)."""
    t0 = time.monotonic()
    check_output_dir(opts.output_prefix)
    sp, tok, dtype, eos, shards, sig_common = _setup(opts)
    del sp
    sig = _overall_signature(shards, sig_common)
    label = opts.output_prefix
    array = opts.array_count is not None
    # also for array tasks: a resubmitted job must not redo sources merged by an earlier one
    man = _up_to_date(opts, sig)
    if man is not None:
        if not opts.quiet:
            print(f"{label}: up to date ({man['documents']} documents, {man['tokens']} tokens)", flush=True)
        return man
    if array:
        if opts.array_index is None or not (0 <= opts.array_index < opts.array_count):
            raise DataPrepError(f"--array-index must be in [0, {opts.array_count})")
        mine = [shards[i] for i in array_slice(len(shards), opts.array_index, opts.array_count)]
        stats = _process(mine, opts, tok, dtype, eos, label) if mine and not merge_only else {}
        el = time.monotonic() - t0
        if not opts.quiet:
            print(f"{label}: array task {opts.array_index}/{opts.array_count}: {len(mine)} of {len(shards)} shards, "
                  f"{stats.get('documents', 0)} documents, {stats.get('tokens', 0)} tokens, {el:.1f}s", flush=True)
        return dict(stats, shards=[s.index for s in mine], elapsed_s=el)
    if not merge_only:
        _process(shards, opts, tok, dtype, eos, label)
    man = _finalize(shards, opts, tok, dtype, t0, sig)
    if not opts.quiet:
        print_summary(man)
    return man


def print_summary(man: dict) -> None:
    sk = man["skipped"]
    sk_s = ", ".join(f"{k}={v}" for k, v in sk.items()) if sk else "none"
    print(f"{man['prefix']}: {man['documents']:,} documents, {man['tokens']:,} tokens ({man['dtype']}), "
          f"{human_bytes(man['text_bytes'])} text, skipped {man['skipped_total']} ({sk_s}), "
          f"{man['elapsed_s']:.1f}s, {man['tokens_per_s'] or 0:,.0f} tokens/s", flush=True)
    for ex in man["skipped_examples"][:5]:
        where = f"{ex['file']}:{ex['line']}"
        if ex.get("from_byte"):
            where = f"{ex['file']}: line {ex['line']} of the lines from byte {ex['from_byte']}"
        sys.stderr.write(f"  skipped {ex['reason']} at {where}\n")
    if man["skipped_total"] > 5:
        sys.stderr.write(f"  (all skip counts in {man['prefix']}.manifest.json)\n")


# ---------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="GLOB",
                   help=".jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt files (globs allowed, repeatable)")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model file (or a dir with tokenizer.model)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--json-key", default="text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the tokenizer's eos id to every document (default: on)")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"])
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="input format (auto: by file name; text: one document per file)")
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
    return p


def options_from_args(a) -> Options:
    if (a.array_index is None) != (a.array_count is None) and not a.merge:
        raise DataPrepError("--array-index and --array-count go together")
    if a.array_count is not None and a.array_count < 1:
        raise DataPrepError("--array-count must be >= 1")
    if a.shards is not None and a.shards < 1:
        raise DataPrepError("--shards must be >= 1")
    inputs = expand_inputs(a.input)
    return Options(inputs, a.tokenizer, a.output_prefix, json_key=a.json_key, workers=a.workers,
                   append_eod=a.append_eod, dtype=a.dtype, fmt=a.format, shards=a.shards,
                   array_index=a.array_index, array_count=None if a.merge else a.array_count,
                   keep_shards=a.keep_shards, chunk_bytes=max(1024, int(a.chunk_mb * (1 << 20))),
                   progress=a.progress, log_interval=a.log_interval, quiet=a.quiet)


def _main(argv=None) -> int:
    setup_logging()
    a = build_parser().parse_args(argv)
    opts = options_from_args(a)
    preprocess(opts, merge_only=a.merge)
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
