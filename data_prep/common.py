"""Shared helpers for data_prep: errors, input discovery, hashing, atomic files, logging.

Kept free of torch / megatron imports so that the preprocessing CLI starts fast.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from typing import Iterable, List, Sequence

log = logging.getLogger("data_prep")

# Input formats.  "auto" picks by file name.
FORMATS = ("auto", "jsonl", "parquet", "text")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
_TEXT_SUFFIXES = (".txt",)


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataPrepError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def detect_format(path: str, forced: str = "auto") -> str:
    if forced and forced != "auto":
        if forced not in FORMATS:
            raise DataPrepError(f"unknown format {forced!r} (choose from {', '.join(FORMATS)})")
        return forced
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    raise DataPrepError(
        f"{path}: unsupported input type (expected .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt; "
        "use --format text to read other files as one document per file)"
    )


def expand_inputs(patterns: Sequence[str], what: str = "--input") -> List[str]:
    """Expand globs/paths into a sorted, de-duplicated list of files.

    Every pattern must match at least one file: a missing input fails at once.
    The order is deterministic (sorted per pattern, patterns in the order given).
    """
    if not patterns:
        raise DataPrepError(f"no input given ({what})")
    out: List[str] = []
    seen = set()
    for pat in patterns:
        pat = os.path.expanduser(os.path.expandvars(pat))
        if glob.has_magic(pat):
            matches = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        else:
            if os.path.isdir(pat):
                raise DataPrepError(f"{what} {pat}: is a directory (give a glob such as {pat}/*.jsonl)")
            if not os.path.exists(pat):
                raise DataPrepError(f"{what} {pat}: no such file")
            matches = [pat]
        if not matches:
            unset = re.findall(r"\$\{?(\w+)", pat)
            hint = f" (environment variable {unset[0]} is not set)" if unset else ""
            raise DataPrepError(f"{what} {pat}: matches no file{hint}")
        for m in matches:
            a = os.path.abspath(m)
            if a not in seen:
                seen.add(a)
                out.append(a)
    for p in out:
        if not os.access(p, os.R_OK):
            raise DataPrepError(f"{what} {p}: not readable")
    return out


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def tmp_name(path: str) -> str:
    """Temporary name next to `path` (same filesystem, so os.replace is atomic)."""
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp{os.getpid()}")


def setup_logging(verbose: bool = False) -> None:
    if log.handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s data_prep %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def run_main(fn, argv=None) -> int:
    """Run a CLI body; DataPrepError -> one clear line on stderr and exit status 2."""
    try:
        rc = fn(argv)
        return 0 if rc is None else rc
    except DataPrepError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} TB"


def chunked(seq: Iterable, n: int):
    buf = []
    for x in seq:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
