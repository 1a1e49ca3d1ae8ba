"""Reading a stage's blend.json (written by `data_prep.plan`) and opening its indexed datasets.

    {"stage": "stage1", "tokenizer": "../tokenizer/tokenizer.model",
     "datasets": [{"prefix": "web", "weight": 0.7, "documents": N, "tokens": N}, ...],
     "token_budget": N}

Paths are relative to the blend.json's directory (or absolute).  This is the one reader of the
format (data_prep only writes it); every error names the file and field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from megafox.config import ConfigError


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


def _number(value, where: str, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise DataError(f"{where}: must be a{'n integer' if integer else ' number'}, got {value!r}")
    return int(value) if integer else float(value)


_INDEX_MAGIC = b"MMIDIDX\x00\x00"


def _check_header(prefix: str, where: str) -> int:
    """Sequence count from the .idx header, checked before megatron maps the files (its reader
    fails on these cases with bare asserts or mmap errors)."""
    import struct

    idx = prefix + ".idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"{where}.prefix: {idx} is not a readable Megatron index (bad header)")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if size < 34 + 12 * sequences + 8 * documents:
        raise DataError(f"{where}.prefix: {idx} is not a readable Megatron index (truncated: {size} bytes)")
    if sequences == 0 or os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"{where}.prefix: {prefix} is an empty dataset (no documents/tokens)")
    return sequences


def _open_lengths(prefix: str, where: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"{where}.prefix: {prefix}{ext} does not exist")
    sequences = _check_header(prefix, where)
    try:
        ds = IndexedDataset(prefix, mmap=True)
        ends = int(ds.index.sequence_pointers[-1]) + int(ds.sequence_lengths[-1]) * ds.index.dtype_size
        # the .idx's int32 lengths right after its 34-byte header, mapped read-only by us (megatron's
        # reader closes its own map when it is collected, which a view of it would not survive)
        lengths = np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=34, shape=(sequences,))
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
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: blend file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON blend ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key in ("tokenizer", "datasets"):
        if key not in raw:
            raise DataError(f"{path}: missing field '{key}'")
    base = os.path.dirname(path)

    def resolve(p: str) -> str:
        p = os.path.expanduser(p)
        return os.path.realpath(p if os.path.isabs(p) else os.path.join(base, p))

    if not isinstance(raw["tokenizer"], str) or not raw["tokenizer"]:
        raise DataError(f"{path}: field 'tokenizer' must be a path")
    tokenizer = resolve(raw["tokenizer"])
    if not os.path.exists(tokenizer):
        raise DataError(f"{path}: field 'tokenizer': {tokenizer} does not exist")
    items = raw["datasets"]
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: field 'datasets' must be a non-empty list")
    entries: List[BlendEntry] = []
    seen = {}
    for i, d in enumerate(items):
        where = f"{path}: datasets[{i}]"
        if not isinstance(d, dict) or "prefix" not in d or "weight" not in d:
            raise DataError(f"{where}: needs 'prefix' and 'weight'")
        weight = _number(d["weight"], f"{where}.weight")
        if not weight > 0:
            raise DataError(f"{where}.weight: must be positive, got {weight}")
        prefix = resolve(str(d["prefix"]))
        if prefix in seen:  # two entries over one file would draw the same samples twice
            raise DataError(f"{where}.prefix: {prefix} is already datasets[{seen[prefix]}]")
        seen[prefix] = i
        lengths = _open_lengths(prefix, where)
        if "documents" in d and _number(d["documents"], f"{where}.documents", True) != len(lengths):
            raise DataError(f"{where}.documents: the blend says {d['documents']} but {prefix}.idx holds "
                            f"{len(lengths)}; the blend is stale, rerun the data plan")
        entries.append(BlendEntry(prefix, weight, lengths, where))
    budget = raw.get("token_budget")
    if budget is not None:
        budget = _number(budget, f"{path}: field 'token_budget'", integer=True)
        if budget <= 0:
            raise DataError(f"{path}: field 'token_budget' must be positive, got {budget}")
    stage = raw.get("stage", os.path.basename(base))
    return Blend(path, str(stage), tokenizer, entries, budget)
