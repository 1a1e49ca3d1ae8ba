"""Merging shards' indexed datasets into one, and choosing the token dtype (--dtype).

The .bin/.idx layout itself is megafox/formats/indexed.py's (the one module that writes and reads it).
"""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np

from .common import DataPrepError, os_error_reason, output_lock, tmp_name
from megafox.formats.dtypes import dtype_name
from megafox.formats.indexed import optimal_dtype, read_idx, write_idx

DTYPE_NAMES = {"uint16": np.uint16, "int32": np.int32}


def choose_dtype(name: str, vocab_size: int):
    if name in (None, "", "auto"):
        return optimal_dtype(vocab_size)
    if name not in DTYPE_NAMES:
        raise DataPrepError(f"--dtype {name!r}: choose auto, uint16 or int32")
    dt = DTYPE_NAMES[name]
    if dt is np.uint16 and vocab_size > 65536:
        raise DataPrepError(f"--dtype uint16 cannot hold a vocabulary of {vocab_size}")
    return dt


def merge_prefixes(prefixes: Sequence[str], out_prefix: str, dtype) -> dict:
    """Concatenate indexed datasets in order into out_prefix (temp files, then rename).

    Runs under out_prefix's writer lock, which first removes the temporaries of a merge killed
    earlier.  An OSError (disk full, quota...) becomes one line naming the file; the previous
    out_prefix files and the inputs are untouched then."""
    with output_lock(out_prefix):
        return _merge(prefixes, out_prefix, dtype)


def _merge(prefixes: Sequence[str], out_prefix: str, dtype) -> dict:
    all_lengths: List[np.ndarray] = []
    bin_tmp, idx_tmp = tmp_name(out_prefix + ".bin"), tmp_name(out_prefix + ".idx")
    writing = out_prefix + ".bin"
    try:
        with open(bin_tmp, "wb") as out:
            for p in prefixes:
                dt, lengths, doc_idx = read_idx(p + ".idx")
                if np.dtype(dt) != np.dtype(dtype):
                    raise DataPrepError(f"{p}.idx: dtype {dtype_name(dt)} differs from {dtype_name(dtype)}")
                if len(doc_idx) != len(lengths) + 1:
                    raise DataPrepError(f"{p}.idx: expected one sequence per document")
                expect = int(lengths.astype(np.int64).sum()) * np.dtype(dtype).itemsize
                if os.path.getsize(p + ".bin") != expect:
                    raise DataPrepError(f"{p}.bin: size does not match its .idx (truncated?)")
                all_lengths.append(lengths)
                _append(p + ".bin", out)
        lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int32)
        writing = out_prefix + ".idx"
        write_idx(idx_tmp, lengths, dtype)
        os.replace(bin_tmp, out_prefix + ".bin")
        os.replace(idx_tmp, out_prefix + ".idx")
    except OSError as e:
        where = e.filename if e.filename and e.filename not in (bin_tmp, idx_tmp) else writing
        raise DataPrepError(f"{where}: {os_error_reason(e)} while merging into {out_prefix}.bin/.idx "
                            "(nothing was replaced; rerun to retry)") from None
    finally:
        for t in (bin_tmp, idx_tmp):
            if os.path.exists(t):
                os.unlink(t)
    return {"documents": int(len(lengths)), "tokens": int(lengths.astype(np.int64).sum())}


def _append(src: str, out) -> None:
    with open(src, "rb") as f:
        while True:
            try:
                buf = f.read(1 << 24)
            except OSError as e:  # name the shard, not the output, when the read side fails
                raise OSError(e.errno, e.strerror, src) from None
            if not buf:
                return
            out.write(buf)
