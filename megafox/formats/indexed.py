"""Megatron's indexed dataset (`PREFIX.bin` + `PREFIX.idx`): the one place that knows its layout.

Byte layout of the .idx (little-endian), identical to megatron.core.datasets.indexed_dataset:
  9 bytes magic b"MMIDIDX\\x00\\x00", u64 version=1, u8 dtype code,
  u64 sequence_count, u64 document_count (= documents + 1),
  int32[sequence_count] lengths, int64[sequence_count] byte pointers,
  int64[document_count] document indices (0, 1, ..., n: one sequence per document).
The .bin holds the sequences' values back to back.  data_prep writes both with numpy only;
megatron-core's IndexedDataset stays the reader the trainer uses for the data itself (tests check
that it reads these files unchanged), and the header checks here come first because its reader fails
on a bad or truncated file with bare asserts or mmap errors.

An SFT stage writes a second indexed dataset per source, its loss masks: PREFIX.mask.bin/.idx,
dtype uint8, the same sequence lengths (1 on the tokens the model is trained to produce).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from megafox.formats import FormatError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic, version, dtype code, the two counts; the lengths start here
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
MASK_DTYPE = np.uint8


def mask_prefix(prefix: str) -> str:
    """Where an SFT dataset's loss masks live, beside its tokens."""
    return prefix + ".mask"


def optimal_dtype(vocab_size: int):
    """Megatron's rule: uint16 when vocab < 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def idx_bytes(lengths: np.ndarray, dtype) -> bytes:
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    head = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type])
    head += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    return b"".join([head, lengths.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
                     doc_idx.astype("<i8").tobytes()])


def write_idx(path: str, lengths, dtype) -> None:
    with open(path, "wb") as f:
        f.write(idx_bytes(lengths, dtype))


class IndexFormatError(FormatError):
    """`path` is not a readable .idx; `reason` says why ("bad header", "truncated: N bytes")."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} is not a readable Megatron index ({reason})")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class IndexHeader:
    dtype: type  # numpy scalar type of the .bin's values
    sequences: int
    documents: int  # document_count: documents + 1


def sequence_count(head: bytes) -> Optional[int]:
    """The sequence count written in a header's bytes (unchecked), None when they stop short of it."""
    return struct.unpack("<Q", head[18:26])[0] if len(head) >= 26 else None


def read_header(path: str) -> IndexHeader:
    """The .idx header, checked: magic, version, dtype code, and a file long enough for its arrays."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != MAGIC or struct.unpack("<Q", head[9:17])[0] != VERSION \
            or head[17] not in CODE_DTYPES:
        raise IndexFormatError(path, "bad header")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if size < HEADER_BYTES + 12 * sequences + 8 * documents:
        raise IndexFormatError(path, f"truncated: {size} bytes")
    return IndexHeader(CODE_DTYPES[head[17]], int(sequences), int(documents))


def map_lengths(path: str, header: IndexHeader) -> np.ndarray:
    """The .idx's int32 sequence lengths, memory-mapped read-only (the ranks of a node share the page
    cache instead of each holding a copy)."""
    return np.memmap(path, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(header.sequences,))


def read_idx(path: str) -> Tuple[type, np.ndarray, np.ndarray]:
    """(dtype, int32 lengths, int64 document indices) of a checked .idx, read whole."""
    header = read_header(path)
    with open(path, "rb") as f:
        buf = f.read()
    lengths = np.frombuffer(buf, dtype="<i4", count=header.sequences, offset=HEADER_BYTES)
    off = HEADER_BYTES + 12 * header.sequences
    doc_idx = np.frombuffer(buf, dtype="<i8", count=header.documents, offset=off)
    return header.dtype, lengths, doc_idx

