"""Reading inputs robustly.

The main process streams each file into chunks (cheap: decompression and cutting at line
boundaries); workers turn chunks into documents (UTF-8 decoding, JSON parsing, validation).
Nothing here raises on bad data: every skipped record gets a reason and a line number. An I/O
error is not bad data: it raises, so no shard is completed with part of a file missing.

Chunk kinds sent to workers:
  ("lines", bytes, first_line)  complete JSONL lines
  ("list",  [values], first_row) parquet column values
  ("text",  bytes, 1)           one whole document (plain text file)
Events handled by the main process itself:
  ("skip", reason, line, count)  e.g. a truncated / corrupt compressed file
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Iterator, List, Optional, Tuple

from megafox.runtime.fs import sha256_file

from .common import DataPrepError

READ_BLOCK = 1 << 20

# Skip reasons (manifest keys).
MALFORMED_JSON = "malformed_json"
NOT_OBJECT = "not_object"
MISSING_KEY = "missing_key"
NOT_STRING = "not_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY = "empty"
TRUNCATED = "truncated_file"
CORRUPT = "corrupt_file"


class FileReader:
    """Iterates chunks of one input file; records size read, sha256, truncation."""

    def __init__(self, path: str, fmt: str, json_key: str, chunk_bytes: int, start: int = 0,
                 end: Optional[int] = None):
        self.path = path
        self.fmt = fmt
        self.json_key = json_key
        self.chunk_bytes = chunk_bytes
        # A byte range [start, end) of an uncompressed JSONL file: it holds the lines whose first
        # byte lies in the range, so consecutive ranges hold every line exactly once.
        self.start, self.end = start, end
        self.range_start = self.range_end = None  # the range's first line start and where reading stopped
        self.sha = hashlib.sha256()  # of the bytes read: the whole file, or the range's lines
        self.bytes_read = 0  # raw (on-disk) bytes consumed so far, for progress
        self.progress_cb = None

    def _tick(self, n: int) -> None:
        self.bytes_read += n
        if self.progress_cb is not None:
            self.progress_cb(n)

    # -- raw byte streams ---------------------------------------------------------------
    def _raw(self, f) -> Iterator[bytes]:
        if self.start or self.end is not None:
            yield from self._raw_range(f)
            return
        while True:
            b = f.read(READ_BLOCK)
            if not b:
                return
            self.sha.update(b)
            self._tick(len(b))
            yield b

    def _raw_range(self, f) -> Iterator[bytes]:
        pos = self.start
        if pos > 0:
            # The line holding byte start-1 belongs to the previous range unless it ends there.
            f.seek(pos - 1)
            while True:
                b = f.read(READ_BLOCK)
                if not b:
                    self.range_start = self.range_end = f.tell()
                    return
                i = b.find(b"\n")
                if i >= 0:
                    pos = f.tell() - len(b) + i + 1
                    break
            f.seek(pos)
        self.range_start = pos
        end = self.end if self.end is not None else float("inf")
        last = b"\n"
        while pos < end:
            b = f.read(int(min(READ_BLOCK, end - pos)))
            if not b:
                break
            pos += len(b)
            last = b[-1:]
            self.sha.update(b)
            self._tick(len(b))
            yield b
        while last != b"\n":  # finish the line that started inside the range
            b = f.read(READ_BLOCK)
            if not b:
                break
            i = b.find(b"\n")
            if i >= 0:
                b, last = b[: i + 1], b"\n"
            pos += len(b)
            self.sha.update(b)
            self._tick(len(b))
            yield b
        self.range_end = pos

    def _decompressed(self, f, errors: List[Tuple[str, str]]) -> Iterator[bytes]:
        name = self.path.lower()
        if name.endswith(".gz"):
            new = lambda: zlib.decompressobj(zlib.MAX_WBITS | 16)  # noqa: E731
            exc: tuple = (zlib.error,)
        elif name.endswith(".zst"):
            import zstandard  # late: only .zst inputs need it (tens of ms at every start otherwise)

            dctx = zstandard.ZstdDecompressor()
            new = dctx.decompressobj  # noqa: E731
            exc = (zstandard.ZstdError,)
        else:
            yield from self._raw(f)
            return
        d = new()
        started = False
        for block in self._raw(f):
            data = block
            while data:
                try:
                    out = d.decompress(data)
                except exc as e:
                    errors.append((CORRUPT, str(e)[:120]))
                    return
                started = True
                if out:
                    yield out
                if d.eof:
                    data = d.unused_data
                    d = new()  # concatenated members / frames
                    started = False
                    if data.strip(b"\x00") == b"":
                        data = b""
                else:
                    data = b""
        if started and not d.eof:
            errors.append((TRUNCATED, "compressed stream ends early"))

    # -- chunks ---------------------------------------------------------------------------
    def chunks(self) -> Iterator[tuple]:
        try:
            if self.fmt == "parquet":
                yield from self._parquet_chunks()
                return
            with open(self.path, "rb") as f:
                if self.fmt == "text":
                    errors: List[Tuple[str, str]] = []
                    data = b"".join(self._decompressed(f, errors))
                    if errors:
                        yield ("skip", errors[0][0], 1, 1)
                    else:
                        yield ("text", data, 1)
                    return
                yield from self._jsonl_chunks(f)
        except OSError as e:
            # An I/O failure is not bad data: skipping would drop the rest of the file from a shard
            # that then counts as complete. Fail instead; the shard is not written and a rerun retries.
            raise DataPrepError(f"{self.path}: read error ({e}); nothing of this shard was kept, rerun to retry") from None

    def _jsonl_chunks(self, f) -> Iterator[tuple]:
        errors: List[Tuple[str, str]] = []
        carry = b""
        line = 1
        pending: List[bytes] = []
        pending_len = 0
        for out in self._decompressed(f, errors):
            cut = out.rfind(b"\n")
            if cut < 0:
                carry += out
                continue
            pending.append(carry)
            pending.append(out[: cut + 1])
            pending_len += len(carry) + cut + 1
            carry = out[cut + 1:]
            if pending_len >= self.chunk_bytes:
                block = b"".join(pending)
                pending, pending_len = [], 0
                yield ("lines", block, line)
                line += block.count(b"\n")
        if pending:
            block = b"".join(pending)
            yield ("lines", block, line)
            line += block.count(b"\n")
        if errors:
            # The partial last line (if any) of a damaged stream is dropped and reported.
            yield ("skip", errors[0][0], line, 1)
        elif carry:
            yield ("lines", carry, line)

    # -- parquet: the record columns, by row groups of PARQUET_BATCH rows
    PARQUET_BATCH = 4096

    def _parquet_columns(self, names: List[str]) -> List[str]:
        """The columns to read (none: the file holds no record)."""
        return [self.json_key] if self.json_key in names else []

    def _parquet_chunk(self, batch) -> tuple:
        """A batch of rows -> (chunk kind, values): the text column's values."""
        return "list", batch.column(0).to_pylist()

    def _parquet_chunks(self) -> Iterator[tuple]:
        import pyarrow.parquet as pq  # late: ~0.5 s to import, and most inputs are JSONL

        self.sha = _FileSha(self.path)
        size = os.path.getsize(self.path)
        try:
            pf = pq.ParquetFile(self.path)
        except Exception:
            self._tick(size)
            yield ("skip", CORRUPT, 0, 1)
            return
        nrows = pf.metadata.num_rows
        columns = self._parquet_columns(pf.schema_arrow.names)
        if not columns:
            self._tick(size)
            if nrows:
                yield ("skip", MISSING_KEY, 1, nrows)
            return
        row, done = 1, 0
        try:
            for batch in pf.iter_batches(batch_size=self.PARQUET_BATCH, columns=columns):
                kind, vals = self._parquet_chunk(batch)
                yield (kind, vals, row)
                row += len(vals)
                step = int(size * row / max(nrows, 1)) - done
                done += step
                self._tick(step)
        except Exception:
            yield ("skip", CORRUPT, row, max(nrows - row + 1, 1))
        self._tick(size - done)


class _FileSha:
    """sha256 computed lazily over the whole file (parquet is read by pyarrow)."""

    def __init__(self, path: str):
        self.path = path

    def hexdigest(self) -> str:
        return sha256_file(self.path)


# ---------------------------------------------------------------------------------------
# Worker side: chunk -> (list of texts, skips)


def json_objects(block: bytes, first: int, skips: List[Tuple[str, int]]) -> Iterator[Tuple[int, dict]]:
    """(line, object) for each JSON object line of a block of complete lines numbered from `first`;
    each other line but a blank one goes to `skips` as (reason, line), in line order."""
    try:
        lines = block.decode("utf-8").split("\n")
        decoded = True
    except UnicodeDecodeError:
        lines = block.split(b"\n")
        decoded = False
    if lines and not lines[-1]:
        lines.pop()
    loads = json.loads
    for i, ln in enumerate(lines):
        if not decoded:
            try:
                ln = ln.decode("utf-8")
            except UnicodeDecodeError:
                skips.append((INVALID_UTF8, first + i))
                continue
        if not ln or ln.isspace():
            continue  # blank line: not a record
        try:
            obj = loads(ln)
        except ValueError:
            skips.append((MALFORMED_JSON, first + i))
            continue
        if not isinstance(obj, dict):
            skips.append((NOT_OBJECT, first + i))
            continue
        yield first + i, obj


def parse_chunk(chunk: tuple, json_key: str) -> Tuple[List[str], List[int], List[Tuple[str, int]]]:
    """Return (texts, line number of each text, [(skip reason, line)])."""
    kind = chunk[0]
    texts: List[str] = []
    good: List[int] = []
    skips: List[Tuple[str, int]] = []

    def document(t, line: int) -> None:
        if not isinstance(t, str):
            skips.append((NOT_STRING, line))
        elif not t or t.isspace():
            skips.append((EMPTY, line))
        else:
            texts.append(t)
            good.append(line)

    if kind == "lines":
        _, block, first = chunk
        for line, obj in json_objects(block, first, skips):
            if json_key in obj:
                document(obj[json_key], line)
            else:
                skips.append((MISSING_KEY, line))
    elif kind == "list":
        _, vals, first = chunk
        for i, t in enumerate(vals):
            document(t, first + i)
    elif kind == "text":
        _, data, first = chunk
        try:
            document(data.decode("utf-8"), first)
        except UnicodeDecodeError:
            skips.append((INVALID_UTF8, first))
    else:
        raise ValueError(f"unknown chunk kind {kind!r}")
    return texts, good, skips


def iter_documents(path: str, fmt: str, json_key: str) -> Iterator[str]:
    """All good documents of one file (used by tokenizer training)."""
    r = FileReader(path, fmt, json_key, 1 << 22)
    for ch in r.chunks():
        if ch[0] == "skip":
            continue
        texts, _, _ = parse_chunk(ch, json_key)
        yield from texts
