"""A stage's blend.json opened for training: its record (megafox/formats/blend.py, the format's one
reader and writer) with every path resolved and every indexed dataset it names checked and mapped.

Every error names the file and field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from megafox.config import ConfigError
from megafox.formats import FormatError
from megafox.formats.blend import BlendRecord
from megafox.formats.indexed import IndexFormatError, IndexHeader, map_lengths, read_header


class DataError(ConfigError):
    """Training data that cannot be used as configured; the message names the file or field."""


@dataclass
class BlendEntry:
    prefix: str  # absolute real path of PREFIX.bin / PREFIX.idx
    weight: float
    # tokens per document (one .idx sequence per document): the .idx's own int32 array, memory-mapped,
    # so the ranks of a node share the page cache instead of each holding a copy (at Fox-1's ~3e9
    # documents an int64 copy was 24 GB per rank)
    lengths: np.ndarray
    field: str  # "PATH: datasets[i]" for messages

    @property
    def num_documents(self) -> int:
        return int(self.lengths.shape[0])


@dataclass
class Blend:
    path: str
    stage: str
    tokenizer: str
    datasets: List[BlendEntry]
    token_budget: Optional[int]
    record: BlendRecord  # the file as written (an SFT stage's own fields among them)


def _check_header(prefix: str, where: str) -> IndexHeader:
    """The .idx header, checked before megatron maps the files (its reader
    fails on these cases with bare asserts or mmap errors)."""
    try:
        header = read_header(prefix + ".idx")
    except IndexFormatError as exc:
        raise DataError(f"{where}.prefix: {exc}") from None
    if header.sequences == 0 or os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"{where}.prefix: {prefix} is an empty dataset (no documents/tokens)")
    return header


def _open_lengths(prefix: str, where: str) -> np.ndarray:
    # megatron-core (and torch with it) loads when a dataset is opened, not when DataError is imported
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"{where}.prefix: {prefix}{ext} does not exist")
    header = _check_header(prefix, where)
    try:
        ds = IndexedDataset(prefix, mmap=True)
        ends = int(ds.index.sequence_pointers[-1]) + int(ds.sequence_lengths[-1]) * ds.index.dtype_size
        # mapped by us: megatron's reader closes its own map when it is collected, which a view of
        # it would not survive
        lengths = map_lengths(prefix + ".idx", header)
        del ds
    except Exception as exc:  # megatron asserts on a bad header / truncated index
        raise DataError(f"{where}.prefix: {prefix}.idx is not a readable Megatron index "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if len(lengths) == 0 or int(lengths.sum(dtype=np.int64)) == 0:
        raise DataError(f"{where}.prefix: {prefix} is an empty dataset (no documents/tokens)")
    if os.path.getsize(prefix + ".bin") < ends:
        raise DataError(f"{where}.prefix: {prefix}.bin is shorter than its .idx says "
                        f"({os.path.getsize(prefix + '.bin')} < {ends} bytes)")
    return lengths


def read_blend(path: str) -> Blend:
    try:
        record = BlendRecord.read(path)
    except FormatError as exc:
        raise DataError(str(exc)) from None
    path = record.path
    tokenizer = record.resolve(record.tokenizer)
    if not os.path.exists(tokenizer):
        raise DataError(f"{path}: field 'tokenizer': {tokenizer} does not exist")
    entries: List[BlendEntry] = []
    seen = {}
    for i, d in enumerate(record.datasets):
        where = f"{path}: datasets[{i}]"
        prefix = record.resolve(d.prefix)
        if prefix in seen:  # two entries over one file would draw the same samples twice
            raise DataError(f"{where}.prefix: {prefix} is already datasets[{seen[prefix]}]")
        seen[prefix] = i
        lengths = _open_lengths(prefix, where)
        if d.documents is not None and d.documents != len(lengths):
            raise DataError(f"{where}.documents: the blend says {d.documents} but {prefix}.idx holds "
                            f"{len(lengths)}; the blend is stale, rerun the data plan")
        entries.append(BlendEntry(prefix, float(d.weight), lengths, where))
    return Blend(path, record.stage, tokenizer, entries, record.token_budget, record)
