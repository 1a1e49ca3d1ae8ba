"""Which documents a curriculum stage read, computed once when the stage completes and kept on disk.

A stage must not re-read documents earlier stages trained on (Megatron-LM #1002; see
`stage_data`).  Recomputing that set at every start of every later stage, from the samples the
earlier stages consumed, costs time and memory that grow with the tokens consumed (hours and
~170 GB per rank at Fox-1's stage 1).  Instead the trainer writes the set once, at the end of a
stage, and every later start reads it:

    <checkpoint.dir>/<stage>.documents/documents.json        the record (commit point, written last)
    <checkpoint.dir>/<stage>.documents/<n>-<token>.bits.npy  one bitmap per dataset prefix

A `DocumentSet` maps each dataset prefix (real path) to a set of its document ids, held as a
bitmap over the prefix's documents (bit d, little-endian within each byte, = document d), so
its size and every operation on it grow with the number of documents, never with the tokens
consumed.  Indexing it (`docs[prefix]`) gives the sorted int64 ids, as the recomputation did.
A record is cumulative: stage N's holds the documents stages 1..N read, so stage N+1 reads one.

documents.json (format "megafox.documents_read", version 1):
    {"format": ..., "version": 1, "stage": "stage2",
     "stages": [{"stage", "blend", "seq_length", "consumed_samples", "token_budget", "seed"}, ...],
     "prefixes": {"/real/path/web": {"file": "0-<token>.bits.npy", "num_documents": N, "read": K,
                                     "idx": {"size": bytes, "sequences": N, "sha256": ...}}}}
`idx` identifies the prefix's .idx (its size, sequence count and a sha256 of its header and of
blocks sampled through it; copies keep it, re-preprocessed data changes it).  A stage that finds
a prefix whose .idx no longer matches refuses to start: the recorded ids would name other
documents.  Writing is atomic (bitmaps under fresh names, then documents.json by rename), so a
crash leaves the previous record or none; bitmaps are read with allow_pickle=False as memory maps.

How a stage's reads are computed (`documents_read_by`): the consumed sample ids are walked in
chunks of `CHUNK` (bounded memory); each GPTDataset sample is the run of document-index positions
between its sample-index entry and the next (both ends included: a sample that stops at offset 0
still reads that document's first token as its label), and the documents at those positions are
marked in a boolean array over the prefix's documents.  This is the set the earlier
implementation computed with np.add.at over positions and np.unique (hash-based in numpy 2.x).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import numpy as np
from megatron.core.datasets.blended_dataset import BlendedDataset

from megafox.data.blend import DataError
from megafox.data.index_cache import open_npy
from megafox.formats.indexed import HEADER_BYTES, sequence_count
from megafox.runtime.fs import atomic_write_bytes

FORMAT = "megafox.documents_read"
VERSION = 1
RECORD_FILE = "documents.json"
CHUNK = 1 << 21  # consumed samples handled at once by documents_read_by
_SAMPLED_BLOCKS, _BLOCK = 16, 1 << 16


def record_dir(checkpoint_dir: Union[str, Path], stage: str) -> Path:
    """Where the trainer keeps the record written at the end of `stage`."""
    return Path(checkpoint_dir) / f"{stage}.documents"


def record_exists(directory: Union[str, Path]) -> bool:
    return (Path(directory) / RECORD_FILE).is_file()


# ------------------------------------------------------------------------------- identity
def idx_fingerprint(prefix: str) -> Dict[str, object]:
    """What identifies PREFIX.idx: size, sequence count, sha256 of its header and sampled blocks."""
    path = prefix + ".idx"
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        h.update(head)
        step = max(_BLOCK, size // _SAMPLED_BLOCKS)
        for offset in list(range(0, size, step)) + [max(0, size - _BLOCK)]:
            f.seek(offset)
            h.update(f.read(_BLOCK))
    sequences = sequence_count(head)
    return {"size": size, "sequences": -1 if sequences is None else int(sequences), "sha256": h.hexdigest()}


# ------------------------------------------------------------------------------- the set
def _popcount(bitmap: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(bitmap).sum(dtype=np.int64))
    return int(np.unpackbits(bitmap).sum(dtype=np.int64))


def pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little")


@dataclass
class PrefixDocuments:
    num_documents: int
    bitmap: np.ndarray  # uint8, ceil(num_documents / 8) bytes; a read-only memory map when read from disk
    idx: Dict[str, object]  # idx_fingerprint of the prefix when the documents were recorded

    def mask(self) -> np.ndarray:
        """Boolean array over the prefix's documents (a fresh array)."""
        return np.unpackbits(self.bitmap, count=self.num_documents, bitorder="little").view(bool)

    def ids(self) -> np.ndarray:
        return np.flatnonzero(self.mask()).astype(np.int64)

    @property
    def count(self) -> int:
        return _popcount(self.bitmap)


@dataclass
class DocumentSet(Mapping):
    """{prefix: sorted int64 document ids}, stored as bitmaps; `stages` says which stages' reads it holds."""

    entries: Dict[str, PrefixDocuments] = field(default_factory=dict)
    stages: List[dict] = field(default_factory=list)
    path: Optional[str] = None  # the documents.json it was read from

    def __getitem__(self, prefix: str) -> np.ndarray:
        return self.entries[prefix].ids()

    def __contains__(self, prefix) -> bool:  # (Mapping's would compute the ids)
        return prefix in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        counts = ", ".join(f"{p}: {e.count}/{e.num_documents}" for p, e in self.entries.items())
        return f"DocumentSet(stages={[s.get('stage') for s in self.stages]}, {{{counts}}})"

    def add(self, prefix: str, mask: np.ndarray, idx: Dict[str, object]) -> None:
        """Union `mask` (booleans over the prefix's documents) into the set."""
        bitmap = pack(mask)
        old = self.entries.get(prefix)
        if old is not None:
            if old.num_documents != len(mask):
                raise DataError(f"{prefix}: {len(mask)} documents now, {old.num_documents} when "
                                f"{self._where()} recorded it")
            bitmap |= old.bitmap
        self.entries[prefix] = PrefixDocuments(len(mask), bitmap, idx)

    def union(self, other: "DocumentSet") -> "DocumentSet":
        out = DocumentSet(dict(self.entries), list(self.stages) + list(other.stages))
        for prefix, e in other.entries.items():
            mine = out.entries.get(prefix)
            if mine is None:
                out.entries[prefix] = e
                continue
            if mine.num_documents != e.num_documents or mine.idx != e.idx:
                raise DataError(f"{prefix}: the .idx differs between the stages being combined "
                                f"({mine.idx} vs {e.idx})")
            out.entries[prefix] = PrefixDocuments(e.num_documents, np.bitwise_or(mine.bitmap, e.bitmap), e.idx)
        return out

    def check_prefix(self, prefix: str, num_documents: int, where: str) -> None:
        """DataError unless PREFIX.idx is the file these document ids were recorded against."""
        e = self.entries[prefix]
        now = idx_fingerprint(prefix)
        if now != e.idx or num_documents != e.num_documents:
            raise DataError(
                f"{self._where()}: {prefix}.idx changed since stage(s) "
                f"{', '.join(str(s.get('stage')) for s in self.stages) or '?'} recorded which of its documents "
                f"they read (recorded: {e.idx['size']} bytes, {e.num_documents} documents, sha256 "
                f"{str(e.idx['sha256'])[:12]}; now: {now['size']} bytes, {num_documents} documents, sha256 "
                f"{str(now['sha256'])[:12]}){'; ' + where if where else ''}: the recorded ids would name other "
                f"documents; restore the original data")

    def _where(self) -> str:
        return self.path or "the documents-read record"


# ------------------------------------------------------------------ reads of a built stage
def _mark(dataset, local_ids: np.ndarray, mask: np.ndarray) -> None:
    """mask[d] = True for every document d that GPTDataset samples `local_ids` read."""
    if len(local_ids) == 0:
        return
    rows = np.asarray(dataset.shuffle_index[local_ids], dtype=np.int64)
    rows.sort()  # walk the sample and document indices forward (memory maps: locality)
    sample_index = dataset.sample_index
    begin = np.asarray(sample_index[rows, 0], dtype=np.int64)
    end = np.asarray(sample_index[rows + 1, 0], dtype=np.int64)
    span = end - begin + 1
    starts = np.cumsum(span) - span
    positions = np.arange(int(starts[-1] + span[-1]), dtype=np.int64) + np.repeat(begin - starts, span)
    mask[np.asarray(dataset.document_index[positions])] = True


def documents_read_by(train, num_samples: int) -> Dict[str, np.ndarray]:
    """{prefix: bool over its documents}: what samples [0, num_samples) of megatron's top-level
    training dataset `train` (a GPTDataset, or a BlendedDataset over GPTDatasets) read."""
    datasets = train.datasets if isinstance(train, BlendedDataset) else [train]
    masks = [np.zeros(ds.dataset.sequence_lengths.shape[0], dtype=bool) for ds in datasets]
    for a in range(0, num_samples, CHUNK):
        b = min(num_samples, a + CHUNK)
        if isinstance(train, BlendedDataset):
            which = np.asarray(train.dataset_index[a:b])
            local = np.asarray(train.dataset_sample_index[a:b], dtype=np.int64)
            for k, ds in enumerate(datasets):
                _mark(ds, local[which == k], masks[k])
        else:
            _mark(train, np.arange(a, b, dtype=np.int64), masks[0])
    return {ds.dataset_path: m for ds, m in zip(datasets, masks)}


def stage_entry(stage: str, blend: str, seq_length: int, consumed_samples: int, token_budget: int,
                seed: int) -> dict:
    return {"stage": stage, "blend": blend, "seq_length": int(seq_length), "consumed_samples": int(consumed_samples),
            "token_budget": int(token_budget), "seed": int(seed)}


# ------------------------------------------------------------------------- the record on disk
def save_document_set(docs: DocumentSet, directory: Union[str, Path]) -> DocumentSet:
    """Write `docs` as the record in `directory` (atomically: the old record stays until the new
    documents.json replaces it); returns it as read back (memory-mapped)."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    prefixes = {}
    for n, (prefix, e) in enumerate(sorted(docs.entries.items())):
        name = f"{n}-{token}.bits.npy"
        tmp = os.path.join(directory, f".{name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(e.bitmap, dtype=np.uint8), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
        prefixes[prefix] = {"file": name, "num_documents": int(e.num_documents), "read": e.count, "idx": e.idx}
    stage = docs.stages[-1]["stage"] if docs.stages else None
    record = {"format": FORMAT, "version": VERSION, "stage": stage, "stages": docs.stages, "prefixes": prefixes}
    atomic_write_bytes(os.path.join(directory, RECORD_FILE), json.dumps(record, indent=1).encode())
    keep = {p["file"] for p in prefixes.values()} | {RECORD_FILE}
    for name in os.listdir(directory):  # the replaced record's bitmaps, and leftovers of killed writes
        if name not in keep and (name.endswith(".bits.npy") or name.endswith(".tmp")):
            os.remove(os.path.join(directory, name))
    return read_documents_read(directory)


def read_documents_read(directory: Union[str, Path]) -> DocumentSet:
    """The record in `directory`; DataError (naming the file) when missing, malformed or corrupt."""
    directory = str(directory)
    path = os.path.join(directory, RECORD_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no documents-read record (it is written when a stage completes)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable documents-read record ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{path}: not a documents-read record (format {raw.get('format') if isinstance(raw, dict) else None!r})")
    if raw.get("version") != VERSION:
        raise DataError(f"{path}: documents-read record version {raw.get('version')!r}; this megafox reads {VERSION}")
    stages, prefixes = raw.get("stages"), raw.get("prefixes")
    if not isinstance(stages, list) or not isinstance(prefixes, dict):
        raise DataError(f"{path}: fields 'stages' (list) and 'prefixes' (object) are required")
    docs = DocumentSet(stages=stages, path=path)
    for prefix, p in prefixes.items():
        where = f"{path}: prefixes[{prefix!r}]"
        if not isinstance(p, dict) or not {"file", "num_documents", "read", "idx"} <= set(p):
            raise DataError(f"{where}: needs 'file', 'num_documents', 'read' and 'idx'")
        name, n = p["file"], p["num_documents"]
        if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".bits.npy"):
            raise DataError(f"{where}.file: {name!r} is not a bitmap file of this record")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{where}.num_documents: {n!r} is not a document count")
        file = os.path.join(directory, name)
        try:
            bitmap = open_npy(file, f"named by {path}")
        except DataError as exc:
            raise DataError(f"documents bitmap {exc}") from None
        if bitmap.dtype != np.uint8 or bitmap.shape != ((n + 7) // 8,):
            raise DataError(f"{file}: not a documents bitmap for {n} documents (dtype {bitmap.dtype}, "
                            f"shape {bitmap.shape})")
        if n % 8 and int(bitmap[-1]) >> (n % 8):
            raise DataError(f"{file}: bits set past document {n - 1}: corrupt")
        entry = PrefixDocuments(n, bitmap, p["idx"])
        if entry.count != p["read"]:
            raise DataError(f"{file}: holds {entry.count} documents, {path} says {p['read']}: corrupt")
        docs.entries[prefix] = entry
    return docs


def write_documents_read(stage_data, consumed_samples: int, directory: Union[str, Path]) -> DocumentSet:
    """At the end of a stage: record the documents its first `consumed_samples` samples read,
    together with everything `stage_data` excluded (the earlier stages' reads), in `directory`.

    A record already there for the same stages (a stage end being redone after a requeue) is
    returned as it is, without recomputing."""
    history = stage_data.excluded_documents.stages + [stage_entry(
        stage_data.stage, stage_data.blend_path, stage_data.seq_length, consumed_samples,
        stage_data.token_budget, stage_data.seed)]
    if record_exists(directory):
        try:
            existing = read_documents_read(directory)
        except DataError:
            existing = None  # unreadable: write it again
        if existing is not None and existing.stages == history:
            return existing
    docs = stage_data.excluded_documents.union(stage_data.documents_read(consumed_samples))
    docs.stages = history
    return save_document_set(docs, directory)


def record_before(config, stage_index: int) -> Optional[DocumentSet]:
    """The documents stages 1..N-1 read: the record stage N-1 wrote when it completed (memory-mapped
    bitmaps); None for the first stage, or when that stage finished before records existed (then
    StageData recomputes them from the earlier stages' specs)."""
    if stage_index == 0:
        return None
    where = record_dir(config.checkpoint.dir, config.stages[stage_index - 1].name)
    return read_documents_read(where) if record_exists(where) else None
