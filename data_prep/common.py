"""Shared helpers for data_prep: errors, input discovery, temporaries and output locks, logging, the CLI frame.

Kept free of torch / megatron imports so that the preprocessing CLI starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import glob
import json
import logging
import os
import re
import socket
import sys
import tempfile
from typing import Dict, Iterator, List, Sequence, Tuple

from megafox.formats import FormatError
from megafox.runtime import cli as runtime_cli
from megafox.runtime.fs import unlink_quiet

log = logging.getLogger("data_prep")

# Input formats.  "auto" picks by file name.
FORMATS = ("auto", "jsonl", "parquet", "text")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
_TEXT_SUFFIXES = (".txt",)


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


def file_stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_json(path: str):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def tmp_name(path: str) -> str:
    """Temporary name next to `path` (same filesystem, so os.replace is atomic)."""
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp{os.getpid()}")


def os_error_reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_output_dir(prefix: str, what: str = "--output-prefix") -> str:
    """Create PREFIX's directory and prove it writable (a probe file, created and removed) before any
    work, so a read-only, full or impossible location fails in one line instead of after hours."""
    d = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise DataPrepError(f"{what} {prefix}: cannot create directory {d} ({os_error_reason(e)})") from None
    try:  # named like atomic_write_bytes' temporaries of PREFIX.bin, so a merge removes it if we die here
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(prefix)}.bin.", suffix=".tmp", dir=d)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise DataPrepError(f"{what} {prefix}: cannot write in {d} ({os_error_reason(e)})") from None
    return d


# Leftovers of a writer killed mid-write: tmp_name()'s ".NAME.tmp<pid>" and atomic_write_bytes()'s
# ".NAME.<8 random chars>.tmp" (tempfile's alphabet).  Matched per final name, exactly, so that
# prefix "web" never touches the temporaries of prefix "web.v2".
def _stale_patterns(name: str) -> Tuple["re.Pattern", "re.Pattern"]:
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.tmp(\d+)$"), re.compile(rf"^\.{n}\.[a-z0-9_]{{8}}\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temporaries(final_paths: Sequence[str], writers_locked_out: bool) -> List[str]:
    """Remove temporaries of `final_paths` left by interrupted writers; returns what was removed.

    writers_locked_out: the caller holds output_lock() for these paths, so every temporary not of
    this process is stale (whatever its host or age).  Without the lock only tmp_name() files whose
    pid is no longer alive on this host are removed."""
    removed = []
    for path in final_paths:
        d, name = os.path.split(os.path.abspath(path))
        with_pid, random_name = _stale_patterns(name)
        try:
            entries = os.listdir(d)
        except FileNotFoundError:
            continue
        for e in entries:
            m = with_pid.match(e)
            if m:
                pid = int(m.group(1))
                stale = pid != os.getpid() and (writers_locked_out or not _pid_alive(pid))
            else:
                stale = writers_locked_out and random_name.match(e) is not None
            if not stale:
                continue
            try:
                os.unlink(os.path.join(d, e))
                removed.append(os.path.join(d, e))
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run: %s", len(removed),
                 ", ".join(os.path.basename(r) for r in removed))
    return removed


def lock_path(prefix: str) -> str:
    d, b = os.path.split(os.path.abspath(prefix))
    return os.path.join(d, f".{b}.lock")


_held_locks: Dict[str, List[int]] = {}  # lock file -> [fd, depth]: re-entrant within this process


@contextlib.contextmanager
def output_lock(prefix: str, suffixes: Sequence[str] = (".bin", ".idx")) -> Iterator[None]:
    """Hold the writer lock of PREFIX while PREFIX+suffix files are written (the merge), and remove
    the temporaries of those files that writers killed earlier left behind.

    An flock on ".PREFIX.lock" next to the output: the kernel drops it when its holder dies, however
    it dies, and NFS / Lustre (mounted with flock) carry it across hosts.  Where the filesystem
    has no locks, only temporaries of dead pids on this host are removed."""
    path = lock_path(prefix)
    finals = [prefix + s for s in suffixes]
    held = _held_locks.get(path)
    if held is not None:
        held[1] += 1
        try:
            remove_stale_temporaries(finals, writers_locked_out=True)
            yield
        finally:
            held[1] -= 1
        return
    fd = _acquire(path, prefix)
    if fd is None:  # no locking on this filesystem
        remove_stale_temporaries(finals, writers_locked_out=False)
        yield
        return
    _held_locks[path] = [fd, 1]
    try:
        remove_stale_temporaries(finals, writers_locked_out=True)
        yield
    finally:
        del _held_locks[path]
        try:
            os.unlink(path)  # while still locked: a waiter that opened it sees a different inode and retries
        except OSError:
            pass
        os.close(fd)


def _acquire(path: str, prefix: str):
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the kernel applies the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise DataPrepError(f"{prefix}: another process ({holder}) is writing it now "
                                f"(lock {path}); wait for it to finish") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                unlink_quiet(path)
                log.warning("%s: the filesystem does not support locks (%s); only temporaries of dead "
                            "local processes are cleaned", path, os_error_reason(e))
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder released and removed it between our open and flock: retry


def setup_logging(verbose: bool = False) -> None:
    if log.handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s data_prep %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


INTERRUPTED = "interrupted; rerun to continue: finished shards are kept"


def run_main(fn, argv=None, interrupted: str = INTERRUPTED) -> int:
    """Run a data_prep CLI body under megafox's one CLI error contract: DataPrepError, or an OSError
    that escaped (disk full, permissions), or a FormatError of the files it reads (megafox.formats) ->
    one line on stderr and exit status 2; Ctrl-C -> one line and 130. Writers only ever put complete files under final names, so either way nothing is
    half-written."""
    return runtime_cli.run_main(fn, argv, errors=(DataPrepError, FormatError), interrupted=interrupted)


def command_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`, described by the first paragraph of its docstring `doc`."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def cli_main(body):
    """Decorator: a data_prep command's body(argv) -> its main(argv): logging set up, then run_main's
    one-line errors and exit statuses."""
    @functools.wraps(body)
    def main(argv=None) -> int:
        setup_logging()
        return run_main(body, argv)

    return main


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} TB"
