"""One curriculum stage's training and validation samples, on megatron-core's GPT datasets.

A stage is a blend.json (weighted Megatron indexed datasets + a SentencePiece tokenizer + a token
budget) read at one sequence length.  `StageData` builds it with `BlendedMegatronDatasetBuilder`
(`GPTDataset` per prefix, `BlendedDataset` over them when there are several), caching the
document/sample/shuffle indices under `cache_dir`.  The stage's samples form ONE global order:
sample id k (0 <= k < num_samples) is the k-th sample of the stage; the training loop only keeps
`consumed_samples`, and `micro_batches(consumed_samples, mbs, dp_rank, dp_size)` hands this DP rank
its share of ids [consumed_samples, consumed_samples + global_batch_size) (`megafox.data.batches`:
the protocol and sampler layout StageData shares with SFT's `SFTData`).

What is guaranteed
------------------
Resume.  The global order depends only on the blend's prefixes and weights, the token budget (the
blend's `token_budget`, or the `token_budget` argument), seq_length, seed, valid_fraction and the
previous stages' specs - never on the data-parallel size, the micro-batch size or the global batch
size.  num_samples = ceil(token_budget / seq_length).  Batch b at DP size d covers exactly
ids [c, c + global_batch_size): micro-batch m of rank r holds ids
c + m*mbs*d + r*mbs + [0, mbs) (megatron's pretraining-sampler layout), so the union over ranks is
the global batch, consecutive batches neither overlap nor leave gaps, and resuming from a saved
`consumed_samples` at any DP size (or a different global batch size) continues the same sequence.

Stage change (Megatron-LM issue #1002).  No document that an earlier stage trained on, even partly,
is read again in this stage, whatever the sequence lengths: this stage's GPTDataset over a shared
prefix (same real path) exposes only the training documents no earlier stage read.  The unread tail
of a document the last earlier sample cut is dropped, not resumed.  If the remaining documents hold
fewer tokens than this stage's budget, megatron repeats them (epochs) within this stage; documents
of earlier stages are never reused.  Prefixes are matched by real path: a copy of the same data
under another name counts as other data.  The earlier stages' reads come from one of:
- `excluded_documents`: the record written once when the previous stage completed
  (`documents_read.write_documents_read`, read back with `read_documents_read`; it holds every
  earlier stage's reads).  Its cost grows with the number of documents, not with the tokens the
  earlier stages consumed.  A prefix whose .idx changed since it was recorded is refused.
- `previous_stages` (runs without a record): the earlier stages in order, each as (blend_path,
  consumed_samples, seq_length) or a dict {"blend", "consumed_samples", "seq_length"[,
  "token_budget", "seed"]}.  Each is rebuilt exactly as it was trained (from the cache; each with
  the stages before it) and the documents its first `consumed_samples` samples read are collected
  per prefix: the same set the record holds, bit for bit, at a cost that grows with those samples.
`excluded_documents` (a `DocumentSet`: {prefix: sorted document ids}) is what was excluded.

Validation.  With valid_fraction f > 0 the last max(1, round(f * N)) documents of each prefix with
N >= 2 documents are held out in every stage (the same documents at any seq_length, so no stage
trains on them while valid_fraction is unchanged across stages).  The held-out order has
num_valid_samples = as many samples as the held-out documents give without repeating any prefix's,
but at least one global batch.  `valid_micro_batches(start, mbs, dp_rank, dp_size)` is
`micro_batches` over that order; a global batch that would pass its end yields nothing.

Samples.  Each sample is seq_length + 1 consecutive tokens of the shuffled, concatenated documents
(documents end with the tokenizer's eos); tokens = the first seq_length, labels = the last
seq_length (shifted by one).  Training samples are never padded, so loss_mask is 1 everywhere
unless eod_mask_loss=True, which zeroes the positions whose input token is eos (the prediction
across a document boundary).

Building.  With torch.distributed initialized every rank calls the constructor; rank 0 builds
missing indices first under an exclusive file lock on cache_dir/.lock (so separate jobs sharing the
cache never write the same files at once) while the other ranks wait for its flag file - not in a
collective, so a build longer than the process group's timeout is fine - and then memory-map them
(`index_cache`: files read with allow_pickle=False, written atomically).  `python -m
megafox.data.build_index` builds the same files ahead of training, in one process.  Only the train
split (and the valid split when f > 0) of this stage are built; earlier stages (previous_stages)
are built for their train split only; no attention masks are made.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megafox.data.batches import Batches
from megafox.data.blend import Blend, DataError, read_blend
from megafox.data.documents_read import (DocumentSet, documents_read_by, idx_fingerprint, record_dir, stage_entry,
                                         write_documents_read)
from megafox.data.index_cache import NoBarrierBuilder, SafeCacheBlendedDataset, SafeCacheGPTDataset, rank0_first
from megafox.formats.tokenizer import SentencePieceTokenizer, TokenizerError, load_tokenizer

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset


@dataclass(frozen=True)
class PreviousStage:
    blend: str
    consumed_samples: int
    seq_length: int
    token_budget: Optional[int] = None  # None: the blend's own token_budget, as StageData defaults to
    seed: Optional[int] = None  # None: the current stage's seed

    @classmethod
    def coerce(cls, spec, index: int) -> "PreviousStage":
        where = f"previous_stages[{index}]"
        if isinstance(spec, PreviousStage):
            return spec
        if isinstance(spec, dict):
            known = {"blend", "blend_path", "consumed_samples", "samples_consumed", "seq_length",
                     "token_budget", "seed", "global_batch_size", "name"}
            unknown = set(spec) - known
            if unknown:
                raise DataError(f"{where}: unknown keys {sorted(unknown)}")
            blend = spec.get("blend", spec.get("blend_path"))
            consumed = spec.get("consumed_samples", spec.get("samples_consumed"))
            seq = spec.get("seq_length")
            budget, seed = spec.get("token_budget"), spec.get("seed")
        elif isinstance(spec, (tuple, list)) and len(spec) == 3:
            (blend, consumed, seq), budget, seed = spec, None, None
        else:
            raise DataError(f"{where}: expected (blend_path, consumed_samples, seq_length) or a dict, got {spec!r}")
        if not blend:
            raise DataError(f"{where}: no blend path")
        for name, v in (("consumed_samples", consumed), ("seq_length", seq)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "consumed_samples" else 1):
                raise DataError(f"{where}.{name}: must be a {'non-negative' if name == 'consumed_samples' else 'positive'} "
                                f"integer, got {v!r}")
        return cls(str(blend), consumed, seq, budget, seed)


@dataclass
class _StageDatasetConfig(GPTDatasetConfig):
    # {prefix: {"train": doc ids, "valid": doc ids}}; the digest keys megatron's index cache
    documents: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    documents_digest: str = ""


class _StageGPTDataset(SafeCacheGPTDataset):
    """GPTDataset over a chosen document subset instead of the builder's contiguous split range."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        indexed_indices = config.documents[dataset_path][index_split.name]
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + ["documents_digest"]


class _StageBlendedDataset(SafeCacheBlendedDataset):
    """(Its class name is part of the blending index's cache key.)"""


class _Builder(NoBarrierBuilder):
    blended_class = _StageBlendedDataset


def _digest(documents: Dict[str, Dict[str, np.ndarray]]) -> str:
    h = hashlib.md5(usedforsecurity=False)
    for prefix in sorted(documents):
        for split in sorted(documents[prefix]):
            h.update(f"{prefix}\0{split}\0".encode())
            ids = documents[prefix][split]
            for a in range(0, len(ids), 1 << 22):  # the digest of the whole int64 array, in slices
                h.update(np.ascontiguousarray(ids[a:a + (1 << 22)], dtype=np.int64))
    return h.hexdigest()


def _split_documents(num_documents: int, valid_fraction: float, excluded: Optional[np.ndarray] = None):
    """(train, valid) document ids: the last documents are held out; `excluded` (booleans over the
    documents) removes training documents earlier stages read."""
    n_valid = 0
    if valid_fraction > 0 and num_documents >= 2:
        n_valid = min(num_documents - 1, max(1, int(round(valid_fraction * num_documents))))
    cut = num_documents - n_valid
    valid = np.arange(cut, num_documents, dtype=np.int32)
    if excluded is None:
        return np.arange(cut, dtype=np.int32), valid
    train = np.empty(cut - int(np.count_nonzero(excluded[:cut])), dtype=np.int32)
    at, step = 0, 1 << 24  # in slices: no int64 array over all documents
    for a in range(0, cut, step):
        ids = np.flatnonzero(~excluded[a:min(cut, a + step)])
        train[at:at + len(ids)] = ids + a
        at += len(ids)
    return train, valid


def _tokens(lengths: np.ndarray, ids: np.ndarray, step: int = 1 << 24) -> int:
    """Tokens in documents `ids` (sorted), read in slices: a contiguous run is summed in place, any
    other selection one slice at a time, so no copy of the lengths over all documents is made."""
    if len(ids) == 0:
        return 0
    if int(ids[-1]) - int(ids[0]) + 1 == len(ids):
        return int(lengths[int(ids[0]):int(ids[-1]) + 1].sum(dtype=np.int64))
    return sum(int(lengths[ids[a:a + step]].sum(dtype=np.int64)) for a in range(0, len(ids), step))


class _Stage:
    """A blend at one sequence length: the built train (and valid) datasets."""

    def __init__(self, blend: Blend, tokenizer: SentencePieceTokenizer, seq_length: int, seed: int,
                 token_budget: int, valid_fraction: float, excluded: DocumentSet,
                 cache_dir: str, valid_min_samples: Optional[int], eod_mask_loss: bool):
        self.blend, self.seq_length = blend, seq_length
        self.num_samples = math.ceil(token_budget / seq_length)
        documents: Dict[str, Dict[str, np.ndarray]] = {}
        valid_samples: Dict[str, int] = {}
        for e in blend.datasets:
            gone = None
            if e.prefix in excluded:
                excluded.check_prefix(e.prefix, e.num_documents, f"{e.field}.prefix")
                gone = excluded.entries[e.prefix].mask()
                if not gone.any():
                    gone = None
            train, valid = _split_documents(e.num_documents, valid_fraction, gone)
            del gone
            if len(train) == 0:
                raise DataError(f"{e.field}.prefix: all training documents of {e.prefix} were read by earlier "
                                f"stages; stage {blend.stage} has nothing left to draw from it")
            tokens = _tokens(e.lengths, train)
            if tokens < seq_length + 1:
                raise DataError(f"{e.field}.prefix: seq_length {seq_length} is larger than the data allows: "
                                f"{e.prefix} has {tokens} tokens for training"
                                f"{' after earlier stages' if len(train) < e.num_documents - len(valid) else ''}, "
                                f"and one sample needs seq_length + 1 = {seq_length + 1}")
            documents[e.prefix] = {"train": train, "valid": valid}
            if len(valid):
                valid_samples[e.prefix] = max(0, (_tokens(e.lengths, valid) - 1) // seq_length)

        digest = _digest(documents)

        def config(split: str, prefixes: List[str], weights: List[float]) -> _StageDatasetConfig:
            # one prefix: no BlendedDataset around its GPTDataset (the builder's weights=None case)
            return _StageDatasetConfig(
                blend=(prefixes, weights if len(prefixes) > 1 else None), random_seed=seed, sequence_length=seq_length, split=split, tokenizer=tokenizer,
                path_to_cache=cache_dir, reset_position_ids=False, reset_attention_mask=False,
                eod_mask_loss=eod_mask_loss, create_attention_mask=False, mid_level_dataset_surplus=0.005,
                documents=documents, documents_digest=digest)

        prefixes = [e.prefix for e in blend.datasets]
        weights = [e.weight for e in blend.datasets]
        self.train = self._build([self.num_samples, 0, 0], config("1,0,0", prefixes, weights), 0)
        self.valid, self.num_valid_samples = None, 0
        if valid_min_samples is not None and valid_samples:
            vp = [p for p in prefixes if p in valid_samples]
            vw = [w for p, w in zip(prefixes, weights) if p in valid_samples]
            total = sum(vw)
            # as many samples as the held-out documents hold without repeating any prefix's,
            # but at least one global batch (small held-out sets then repeat, still never trained on)
            natural = min(int(valid_samples[p] * total / w) for p, w in zip(vp, vw))
            self.num_valid_samples = max(natural, valid_min_samples)
            self.valid = self._build([0, self.num_valid_samples, 0], config("0,1,0", vp, vw), 1)

    @staticmethod
    def _build(sizes: List[int], config: _StageDatasetConfig, split: int):
        # every rank reads its own micro-batches, so every rank holds the datasets
        builder = _Builder(_StageGPTDataset, sizes, lambda: True, config)
        return builder.build()[split]

    def documents_read(self, num_samples: int) -> DocumentSet:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
            raise DataError(f"consumed_samples: must be a non-negative integer, got {num_samples!r}")
        if num_samples > self.num_samples:
            raise DataError(f"{self.blend.path}: {num_samples} samples consumed, but the stage has only "
                            f"{self.num_samples} (token_budget / seq_length {self.seq_length})")
        docs = DocumentSet()
        for prefix, mask in documents_read_by(self.train, int(num_samples)).items():
            docs.add(prefix, mask, idx_fingerprint(prefix))
        return docs


def _load_stage_tokenizer(blend: Blend) -> SentencePieceTokenizer:
    try:
        return load_tokenizer(blend.tokenizer)
    except TokenizerError as exc:
        raise DataError(f"{blend.path}: field 'tokenizer': {exc}") from None


class StageData(Batches):
    def __init__(self, blend_path: str, seq_length: int, global_batch_size: int, seed: int = 1234,
                 cache_dir: Optional[str] = None, valid_fraction: float = 0.01,
                 previous_stages: Sequence = (), token_budget: Optional[int] = None,
                 eod_mask_loss: bool = False, excluded_documents: Optional[DocumentSet] = None):
        for name, v in (("seq_length", seq_length), ("global_batch_size", global_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"{name}: must be a positive integer, got {v!r}")
        if not (isinstance(valid_fraction, (int, float)) and 0 <= valid_fraction < 1):
            raise DataError(f"valid_fraction: must be in [0, 1), got {valid_fraction!r}")
        if excluded_documents is not None and not isinstance(excluded_documents, DocumentSet):
            raise DataError(f"excluded_documents: expected a DocumentSet (read_documents_read), got "
                            f"{type(excluded_documents).__name__}")
        if excluded_documents is not None and len(previous_stages):
            raise DataError("excluded_documents and previous_stages: pass one (the record of the earlier "
                            "stages' reads, or the stages to recompute it from)")
        self.seq_length, self.global_batch_size, self.seed = seq_length, global_batch_size, int(seed)
        self.valid_fraction = float(valid_fraction)
        blend = read_blend(blend_path)
        self.blend_path, self.stage = blend.path, blend.stage
        self.tokenizer = _load_stage_tokenizer(blend)
        self.cache_dir = os.path.abspath(cache_dir or os.path.join(os.path.dirname(blend.path), ".cache"))
        self.token_budget = self._budget(blend, token_budget, "token_budget")
        previous = [PreviousStage.coerce(p, i) for i, p in enumerate(previous_stages)]

        def build():
            excluded = excluded_documents if excluded_documents is not None else self._recompute(previous, eod_mask_loss)
            stage = _Stage(blend, self.tokenizer, seq_length, self.seed, self.token_budget, self.valid_fraction,
                           excluded, self.cache_dir, global_batch_size if self.valid_fraction > 0 else None,
                           eod_mask_loss)
            return excluded, stage

        # rank 0 builds missing indices first; the other ranks wait on a file, not a collective
        self.excluded_documents, self._stage = rank0_first(self.cache_dir, build, f"the indices of {blend.path}")
        self.num_samples = self._stage.num_samples
        self.num_valid_samples = self._stage.num_valid_samples

    def _recompute(self, previous: List[PreviousStage], eod_mask_loss: bool) -> DocumentSet:
        """The earlier stages' reads from their consumed samples (runs without a documents-read record)."""
        excluded = DocumentSet()
        for i, prev in enumerate(previous):
            pblend = read_blend(prev.blend)
            seed = self.seed if prev.seed is None else int(prev.seed)
            budget = self._budget(pblend, prev.token_budget, f"previous_stages[{i}].token_budget")
            earlier = _Stage(pblend, _load_stage_tokenizer(pblend), prev.seq_length, seed, budget,
                             self.valid_fraction, excluded, self.cache_dir, None, eod_mask_loss)
            excluded = excluded.union(earlier.documents_read(prev.consumed_samples))
            excluded.stages = excluded.stages + [stage_entry(pblend.stage, pblend.path, prev.seq_length,
                                                             prev.consumed_samples, budget, seed)]
        return excluded

    @staticmethod
    def _budget(blend: Blend, override: Optional[int], name: str) -> int:
        if override is not None:
            if isinstance(override, bool) or not isinstance(override, int) or override < 1:
                raise DataError(f"{name}: must be a positive integer, got {override!r}")
            return override
        if blend.token_budget is None:
            raise DataError(f"{blend.path}: missing field 'token_budget' (or pass token_budget)")
        return blend.token_budget

    # ------------------------------------------------------------------------------ batches
    def _samples_source(self) -> str:
        return (f"{self.blend_path} gives {self.num_samples} samples (token_budget {self.token_budget} / seq_length "
                f"{self.seq_length}); raise its token_budget or train fewer steps")

    def _collate(self, ids: np.ndarray, valid: bool) -> Dict[str, torch.Tensor]:
        dataset = self._stage.valid if valid else self._stage.train
        items = [dataset[int(i)] for i in ids]
        return {"tokens": torch.stack([it["tokens"] for it in items]).long(),
                "labels": torch.stack([it["labels"] for it in items]).long(),
                "loss_mask": torch.stack([it["loss_mask"] for it in items]).float(),
                "sample_index": torch.from_numpy(ids.copy())}

    @property
    def train_dataset(self):
        """megatron's top-level training dataset (BlendedDataset, or GPTDataset for one prefix)."""
        return self._stage.train

    @property
    def valid_dataset(self):
        return self._stage.valid

    # ------------------------------------------------------------------------------ documents read
    def documents_read(self, num_samples: int) -> DocumentSet:
        """{prefix: sorted document ids} that this stage's first `num_samples` training samples read
        (only this stage's; `documents_read.write_documents_read` adds the earlier stages')."""
        return self._stage.documents_read(num_samples)

    def record_reads(self, checkpoint_dir, stage_name: str, consumed_samples: int) -> Optional[str]:
        """The documents this stage read, with every earlier stage's, recorded once at its end so
        later stages never recompute them (`documents_read.write_documents_read`)."""
        directory = record_dir(checkpoint_dir, stage_name)
        write_documents_read(self, consumed_samples, directory)
        return directory.name
