"""Megatron indexed dataset (.bin/.idx) written with numpy only.

Byte layout (little-endian), identical to megatron.core.datasets.indexed_dataset:
  9 bytes magic b"MMIDIDX\\x00\\x00", u64 version=1, u8 dtype code,
  u64 sequence_count, u64 document_count (= documents + 1),
  int32[sequence_count] lengths, int64[sequence_count] byte pointers,
  int64[document_count] document indices (0, 1, ..., n: one sequence per document).
Tests check that megatron-core's IndexedDataset reads these files unchanged.
"""

from __future__ import annotations

import os
import struct
from typing import List, Sequence

import numpy as np

from .common import DataPrepError, os_error_reason, output_lock, tmp_name

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_NAMES = {"uint16": np.uint16, "int32": np.int32}


def optimal_dtype(vocab_size: int):
    """Megatron's rule: uint16 when vocab < 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def choose_dtype(name: str, vocab_size: int):
    if name in (None, "", "auto"):
        return optimal_dtype(vocab_size)
    if name not in DTYPE_NAMES:
        raise DataPrepError(f"--dtype {name!r}: choose auto, uint16 or int32")
    dt = DTYPE_NAMES[name]
    if dt is np.uint16 and vocab_size > 65536:
        raise DataPrepError(f"--dtype uint16 cannot hold a vocabulary of {vocab_size}")
    return dt


def dtype_name(dt) -> str:
    return np.dtype(dt).name


def idx_bytes(lengths: np.ndarray, dtype) -> bytes:
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    head = MAGIC + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type])
    head += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    return b"".join([head, lengths.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
                     doc_idx.astype("<i8").tobytes()])


def write_idx(path: str, lengths, dtype) -> None:
    with open(path, "wb") as f:
        f.write(idx_bytes(lengths, dtype))


def read_idx(path: str):
    """Return (dtype, lengths int32 array, document_indices int64 array)."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:9] != MAGIC:
        raise DataPrepError(f"{path}: not a Megatron .idx file")
    code = buf[17]
    seq_count, doc_count = struct.unpack_from("<QQ", buf, 18)
    off = 34
    lengths = np.frombuffer(buf, dtype="<i4", count=seq_count, offset=off)
    off += 4 * seq_count + 8 * seq_count
    doc_idx = np.frombuffer(buf, dtype="<i8", count=doc_count, offset=off)
    return CODE_DTYPES[code], lengths, doc_idx


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
