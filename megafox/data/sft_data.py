"""Supervised fine-tuning data: chat conversations packed into fixed-length sequences.

`SFTData` is the trainer's `megafox.data.batches.Batches` (as pretraining's `StageData`:
`micro_batches(consumed_samples, micro_batch_size, dp_rank, dp_size)`, `valid_micro_batches(...)`,
`pipeline_shape`, `num_samples`, `tokenizer`, `check_vocab`), over an SFT blend.json written by data_prep:

    {"kind": "sft", "stage": "sft", "tokenizer": "...", "seq_length": 8192, "chat_template": "...",
     "datasets": [{"prefix": "chat", "mask_prefix": "chat.mask", "weight": 1.0,
                   "documents": N, "tokens": N, "trained_tokens": N}, ...]}

PREFIX.bin/.idx holds the token ids (Megatron indexed format, one sequence = one conversation),
MASK_PREFIX.bin/.idx a uint8 indexed dataset of the same lengths: mask[i] = 1 when token i is a
target to learn (assistant content and its end-of-turn token).  `mask_prefix` defaults to
PREFIX.mask.  Both are memory-mapped; the corpus is never loaded into memory.

What a training sample is
-------------------------
A sample is one row of seq_length tokens holding whole conversations one after another, then
padding.  In each micro-batch dict ([micro_batch_size, seq_length] unless said otherwise):
  tokens        the conversations' ids; padding is the tokenizer's pad id (eos when it has none)
  labels        tokens shifted by one *within* a conversation; pad at a conversation's last position
  loss_mask     float, 1 where the label is a target: position t of a conversation is trained iff
                mask[t + 1] = 1; 0 at every conversation's last position and on padding
  position_ids  0, 1, ... restarting at every conversation (and at the padding)
  cu_seqlens    int32 [segments + 1]: segment boundaries over the micro-batch flattened to
                micro_batch_size x seq_length tokens; every row start is a boundary and the
                padding of a row is a segment of its own, so no segment is empty
  max_seqlen    int32 scalar tensor: the longest segment
  sample_index  int64 [micro_batch_size]: the global sample ids
`megafox.training.step.forward_step` turns cu_seqlens/max_seqlen into megatron-core's
PackedSeqParams (THD format): attention never crosses a segment and RoPE positions restart in each.

What is guaranteed
------------------
Order.  The samples of the run form ONE global order that depends only on the blend's datasets
(paths, lengths, weights, order), seed, seq_length, valid_fraction and pack_window, never on the
data-parallel size, micro-batch size or global batch size.  Micro-batch m of DP rank r at
consumed_samples c holds samples c + m*mbs*dp + r*mbs + [0, mbs), as StageData; consecutive
global batches neither overlap nor leave gaps, and resuming from a saved consumed_samples at any
layout continues the same sequence of samples.

Epochs.  Epoch e draws c_i conversations from dataset i, c_i = its weight's share of all the
training conversations (largest remainder), from that dataset's own stream of seeded
permutations of its conversations: no conversation of a dataset is drawn a second time before all
of that dataset's have been drawn.  With weights proportional to the datasets' conversation counts
(or one dataset) every conversation is in every epoch exactly once; a larger weight upsamples, a
smaller one spreads a dataset over several epochs.  The epoch's conversations are shuffled
together (seeded by seed and epoch), packed (`megafox.data.packing.pack`: best-fit decreasing in
windows of pack_window conversations), and the resulting sequences shuffled again, so the rows of
a batch are not sorted by length.  Epochs follow each other in the global order;
num_real_samples = the sequences of all epochs (a global batch may span two epochs).

The last global batch.  num_samples = num_real_samples rounded UP to a whole global batch: the
samples past num_real_samples are rows of padding only (loss_mask 0), which the per-token loss
ignores, so every conversation of the last epoch is trained and no step is dropped.

Validation.  With valid_fraction f > 0 the last max(1, round(f * N)) conversations of each dataset
with N >= 2 are held out (as StageData does: the same conversations at any seed or seq_length),
packed once; num_valid_samples is rounded up to a whole global batch the same way.
`valid_micro_batches(start, ...)` yields nothing once [start, start + global batch) passes it.

Cost. The plan of each epoch (and of the validation set) is cached under cache_dir as two .npy
files (conversation ids in packed order, int64 sequence offsets), keyed by an MD5 of everything the
order depends on (raising `epochs` reuses the epochs already built). With torch.distributed
initialized every rank calls the constructor: rank 0 builds the missing plans under the cache lock
(`megafox.data.index_cache.rank0_first`, as StageData), the others then memory-map them. Building
costs a few seconds per million conversations per epoch (~20 s for Fox-1-Instruct's 5B tokens, ~5M
conversations) and ~9 bytes per conversation on disk; packing fills 99.9% of the rows
(bench/packing.py, bench/RESULTS_packing.md). Plans are loaded with
`megafox.data.index_cache.load_index_array` (plain integer arrays only, never a pickle) and written
under a temporary name first, so a killed build never leaves a plan that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megafox.data.batches import Batches
from megafox.data.blend import Blend, DataError, read_blend
from megafox.data.index_cache import load_index_array, rank0_first
from megafox.data.packing import DEFAULT_WINDOW, PackPlan, pack, permute_sequences
from megafox.formats.indexed import mask_prefix as indexed_mask_prefix
from megafox.formats.tokenizer import TokenizerError, load_tokenizer

logger = logging.getLogger(__name__)

# Part of every cache key: a change to how plans are built must never reuse old plan files.
_PLAN_VERSION = "sft-plan-1"
# SeedSequence tags: the random streams of one seed never coincide
_DATASET_STREAM, _EPOCH_MIX, _SEQUENCE_ORDER, _VALID_MIX = 1, 2, 3, 4


@dataclass
class SFTDataset:
    """One blend entry: conversations (PREFIX) and their trained-token masks (MASK_PREFIX)."""

    prefix: str
    mask_prefix: str
    weight: float
    lengths: np.ndarray  # tokens per conversation
    field: str  # "BLEND: datasets[i]" for messages
    trained_tokens: Optional[int]  # as data_prep counted them (informational)
    train_ids: np.ndarray = None  # conversations trained on (non-empty, not held out)
    valid_ids: np.ndarray = None  # held-out conversations (non-empty)


@dataclass(frozen=True)
class EpochStats:
    conversations: int
    sequences: int
    tokens: int  # real (non-padding) tokens
    seq_length: int

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / (self.sequences * self.seq_length) if self.sequences else 0.0


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"{name}: must be an integer >= {low}, got {value!r}")
    return int(value)


def _open_mask(mask_prefix: str, lengths: np.ndarray, where: str):
    for ext in (".idx", ".bin"):
        if not os.path.isfile(mask_prefix + ext):
            raise DataError(f"{where}.mask_prefix: {mask_prefix}{ext} does not exist")
    try:
        masks = IndexedDataset(mask_prefix, mmap=True)
        mask_lengths = np.asarray(masks.sequence_lengths, dtype=np.int64)
        dtype = masks.index.dtype
    except Exception as exc:  # megatron asserts on a bad header / truncated index
        raise DataError(f"{where}.mask_prefix: {mask_prefix}.idx is not a readable Megatron index "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if np.dtype(dtype) != np.uint8:
        raise DataError(f"{where}.mask_prefix: {mask_prefix} holds {np.dtype(dtype).name}, expected uint8 masks")
    if mask_lengths.shape != lengths.shape or not np.array_equal(mask_lengths, lengths):
        differ = (np.flatnonzero(mask_lengths != lengths)[:1].tolist() if mask_lengths.shape == lengths.shape
                  else None)
        detail = (f"conversation {differ[0]} has {lengths[differ[0]]} tokens but {mask_lengths[differ[0]]} "
                  f"mask values" if differ else f"{len(lengths)} conversations but {len(mask_lengths)} masks")
        raise DataError(f"{where}.mask_prefix: {mask_prefix} does not match its tokens ({detail}); "
                        f"the blend is stale, prepare the SFT data again")
    expected = int(lengths.sum()) * np.dtype(np.uint8).itemsize
    if os.path.getsize(mask_prefix + ".bin") < expected:
        raise DataError(f"{where}.mask_prefix: {mask_prefix}.bin is shorter than its .idx says")
    return masks


def _read_sft_blend(path: str) -> Tuple[Blend, List[SFTDataset]]:
    blend = read_blend(path)  # the record (megafox/formats/blend.py) and its datasets opened
    record = blend.record
    if record.kind != "sft":
        raise DataError(f"{blend.path}: field 'kind' is {record.kind!r}; SFT training reads a blend with "
                        f"\"kind\": \"sft\" (conversations + masks), pretraining blends are read by StageData")
    datasets = []
    for entry, item in zip(blend.datasets, record.datasets):
        if item.mask_prefix is None:  # the default: PREFIX.mask beside the token prefix it belongs to
            mask_prefix = indexed_mask_prefix(entry.prefix)
        else:  # relative to the blend, like every path it names
            mask_prefix = record.resolve(item.mask_prefix)
        datasets.append(SFTDataset(entry.prefix, os.path.realpath(mask_prefix), entry.weight, entry.lengths,
                                   entry.field, item.trained_tokens))
    return blend, datasets


def _held_out(num_conversations: int, valid_fraction: float) -> int:
    """How many of a dataset's conversations (its last ones) validation keeps: StageData's rule."""
    if valid_fraction > 0 and num_conversations >= 2:
        return min(num_conversations - 1, max(1, int(round(valid_fraction * num_conversations))))
    return 0


def _epoch_shares(weights: Sequence[float], total: int) -> np.ndarray:
    """Conversations per dataset in one epoch: each weight's share of `total` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact + 1e-9).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:  # ties go to the earlier dataset
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class SFTData(Batches):
    def __init__(self, blend_path: str, seq_length: int, global_batch_size: int, seed: int = 1234,
                 epochs: int = 1, valid_fraction: float = 0.01, cache_dir: Optional[str] = None,
                 pack_window: int = DEFAULT_WINDOW):
        self.seq_length = _positive_int("seq_length", seq_length)
        self.global_batch_size = _positive_int("global_batch_size", global_batch_size)
        self.seed = _positive_int("seed", seed, 0)
        self.epochs = _positive_int("epochs", epochs)
        self.pack_window = _positive_int("pack_window", pack_window)
        if not (isinstance(valid_fraction, (int, float)) and not isinstance(valid_fraction, bool)
                and 0 <= valid_fraction < 1):
            raise DataError(f"valid_fraction: must be in [0, 1), got {valid_fraction!r}")
        self.valid_fraction = float(valid_fraction)

        blend, self.datasets = _read_sft_blend(blend_path)
        self.blend_path, self.stage = blend.path, blend.stage
        self.chat_template = blend.record.chat_template
        try:
            self.tokenizer = load_tokenizer(blend.tokenizer)
        except TokenizerError as exc:
            raise DataError(f"{blend.path}: field 'tokenizer': {exc}") from None
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        self.cache_dir = os.path.abspath(cache_dir or os.path.join(os.path.dirname(blend.path), ".cache"))

        self._tokens, self._masks = [], []
        for d in self.datasets:
            too_long = np.flatnonzero(d.lengths > self.seq_length)
            if len(too_long):
                worst = int(too_long[np.argmax(d.lengths[too_long])])
                raise DataError(
                    f"{d.field}.prefix: {d.prefix} has {len(too_long)} conversation(s) longer than seq_length "
                    f"{self.seq_length} (the longest, #{worst}, has {int(d.lengths[worst])} tokens; the blend "
                    f"was prepared for seq_length {blend.record.seq_length}); prepare the data again with "
                    f"seq_length <= {self.seq_length}, which truncates them")
            self._masks.append(_open_mask(d.mask_prefix, d.lengths, d.field))
            self._tokens.append(IndexedDataset(d.prefix, mmap=True))
            # an empty conversation holds no token to train on or attend to
            cut = len(d.lengths) - _held_out(len(d.lengths), self.valid_fraction)
            d.train_ids = np.flatnonzero(d.lengths[:cut] > 0).astype(np.int64)
            d.valid_ids = cut + np.flatnonzero(d.lengths[cut:] > 0).astype(np.int64)
            if len(d.train_ids) == 0:
                raise DataError(f"{d.field}.prefix: {d.prefix} has no conversation to train on")
        # conversation ids in the plans are global: dataset i's conversation j is bases[i] + j
        self._bases = np.zeros(len(self.datasets) + 1, dtype=np.int64)
        np.cumsum([len(d.lengths) for d in self.datasets], out=self._bases[1:])
        self._all_lengths = np.concatenate([d.lengths for d in self.datasets]).astype(np.int64)
        self.epoch_shares = _epoch_shares([d.weight for d in self.datasets],
                                          sum(len(d.train_ids) for d in self.datasets))
        self._key = self._digest()

        # rank 0 builds the missing plans first; the other ranks then find them (or, on a cache_dir
        # they do not share, build the same ones themselves)
        rank0_first(self.cache_dir, self._ensure_plans, "the SFT packing plans")
        self._train = [self._load(f"train-e{epoch:04d}") for epoch in range(self.epochs)]
        self.epoch_stats = [self._stats(plan) for plan in self._train]
        self._epoch_starts = np.zeros(self.epochs + 1, dtype=np.int64)
        np.cumsum([s.sequences for s in self.epoch_stats], out=self._epoch_starts[1:])
        self.num_real_samples = int(self._epoch_starts[-1])
        self.num_samples = self._round_up(self.num_real_samples)
        self.packing_efficiency = (sum(s.tokens for s in self.epoch_stats)
                                   / (self.num_real_samples * self.seq_length))
        self._valid = self._load("valid") if self._has_valid else None
        self.valid_stats = self._stats(self._valid) if self._valid else None
        self.num_valid_real_samples = self.valid_stats.sequences if self._valid else 0
        self.num_valid_samples = self._round_up(self.num_valid_real_samples)
        logger.info("SFT data %s: %d epoch(s), %d conversations/epoch -> %d sequences of %d tokens "
                    "(%d steps of %d), packing efficiency %.2f%%", self.blend_path, self.epochs,
                    self.epoch_stats[0].conversations, self.num_real_samples, self.seq_length,
                    self.num_samples // self.global_batch_size, self.global_batch_size,
                    100 * self.packing_efficiency)

    # ------------------------------------------------------------------------------ plans
    @property
    def _has_valid(self) -> bool:
        return any(len(d.valid_ids) for d in self.datasets)

    def _round_up(self, n: int) -> int:
        return math.ceil(n / self.global_batch_size) * self.global_batch_size

    def _digest(self) -> str:
        h = hashlib.md5(usedforsecurity=False)
        h.update(json.dumps([_PLAN_VERSION, self.seq_length, self.seed, self.pack_window,
                             self.valid_fraction]).encode())
        for d in self.datasets:
            h.update(json.dumps([d.prefix, repr(d.weight), len(d.lengths)]).encode())
            h.update(np.ascontiguousarray(d.lengths, dtype=np.int64).tobytes())
        return h.hexdigest()

    def _path(self, name: str, part: str) -> str:
        return os.path.join(self.cache_dir, f"sft-{self._key}-{name}-{part}.npy")

    def _ensure_plans(self) -> None:
        for epoch in range(self.epochs):
            self._ensure(f"train-e{epoch:04d}", lambda e=epoch: self._build_epoch(e))
        if self._has_valid:
            self._ensure("valid", self._build_valid)

    def _ensure(self, name: str, build) -> None:
        paths = [self._path(name, part) for part in ("conversations", "sequences")]
        if all(os.path.exists(p) for p in paths):
            return
        start = time.time()
        plan = build()
        for path, array in zip(paths, (plan.order, plan.offsets)):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, path)  # a crash mid-write never leaves a plan under its final name
        logger.info("SFT plan %s: %d conversations -> %d sequences in %.1f s", name, len(plan.order),
                    plan.num_sequences, time.time() - start)

    def _load(self, name: str) -> PackPlan:
        order, offsets = (load_index_array(self._path(name, part), 1) for part in ("conversations", "sequences"))
        consistent = len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(order)
        if not consistent or int(order.max(initial=0)) >= len(self._all_lengths):
            raise DataError(f"data cache {self._path(name, 'sequences')}: not a plan of this blend; "
                            f"delete it to rebuild")
        return PackPlan(order, offsets)

    def _stats(self, plan: PackPlan) -> EpochStats:
        return EpochStats(len(plan.order), plan.num_sequences, int(self._all_lengths[plan.order].sum()),
                          self.seq_length)

    def _epoch_conversations(self, epoch: int) -> np.ndarray:
        """Global ids of the conversations of `epoch`, in its seeded mixed order (before packing)."""
        parts = []
        for i, (d, share) in enumerate(zip(self.datasets, self.epoch_shares)):
            n = len(d.train_ids)
            draws = np.arange(epoch * int(share), (epoch + 1) * int(share), dtype=np.int64)
            picked = np.empty(len(draws), dtype=np.int64)
            cycles = draws // n
            for cycle in np.unique(cycles).tolist():
                sel = cycles == cycle
                picked[sel] = _rng(self.seed, _DATASET_STREAM, i, cycle).permutation(n)[draws[sel] % n]
            parts.append(self._bases[i] + d.train_ids[picked])
        ids = np.concatenate(parts)
        _rng(self.seed, _EPOCH_MIX, epoch).shuffle(ids)
        return ids

    def _pack(self, ids: np.ndarray, order_key: Tuple[int, ...]) -> PackPlan:
        plan = pack(self._all_lengths[ids], self.seq_length, self.pack_window)
        plan = PackPlan(ids[plan.order], plan.offsets)
        # best-fit emits each window's sequences longest conversation first: shuffle them
        return permute_sequences(plan, _rng(self.seed, *order_key).permutation(plan.num_sequences))

    def _build_epoch(self, epoch: int) -> PackPlan:
        return self._pack(self._epoch_conversations(epoch), (_SEQUENCE_ORDER, epoch))

    def _build_valid(self) -> PackPlan:
        ids = np.concatenate([self._bases[i] + d.valid_ids for i, d in enumerate(self.datasets)])
        _rng(self.seed, _VALID_MIX).shuffle(ids)
        return self._pack(ids, (_VALID_MIX, 1))

    # ------------------------------------------------------------------------------ samples
    def conversations_of(self, sample: int, valid: bool = False) -> List[Tuple[str, int]]:
        """(dataset prefix, conversation id) of each conversation in a sample, in row order."""
        return [(self.datasets[ds].prefix, doc) for ds, doc in self._members(sample, valid)]

    def _members(self, sample: int, valid: bool) -> List[Tuple[int, int]]:
        if valid:
            plan, local = self._valid, sample
            if plan is None or sample >= plan.num_sequences:
                return []
        else:
            if sample >= self.num_real_samples:
                return []  # a padding row that completes the last global batch
            epoch = int(np.searchsorted(self._epoch_starts, sample, side="right")) - 1
            plan, local = self._train[epoch], sample - int(self._epoch_starts[epoch])
        gids = np.asarray(plan.order[int(plan.offsets[local]):int(plan.offsets[local + 1])])
        which = np.searchsorted(self._bases, gids, side="right") - 1
        return list(zip(which.tolist(), (gids - self._bases[which]).tolist()))

    def _collate(self, ids: np.ndarray, valid: bool) -> Dict[str, torch.Tensor]:
        s, b = self.seq_length, len(ids)
        tokens = np.full((b, s), self.pad_id, dtype=np.int64)
        labels = np.full((b, s), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros((b, s), dtype=np.float32)
        position_ids = np.zeros((b, s), dtype=np.int64)
        bounds = [0]
        for row, sample in enumerate(ids.tolist()):
            at, first = 0, row * s
            for ds, doc in self._members(sample, valid):
                ids_ = self._tokens[ds].get(doc)
                mask = self._masks[ds].get(doc)
                n = len(ids_)
                if at:
                    bounds.append(first + at)
                tokens[row, at:at + n] = ids_
                labels[row, at:at + n - 1] = ids_[1:]
                # the input at t is trained when the token it predicts, t + 1, is a target
                loss_mask[row, at:at + n - 1] = mask[1:] != 0
                position_ids[row, at:at + n] = np.arange(n)
                at += n
            if at < s:  # the padding is a segment of its own: it attends only to itself
                if at:
                    bounds.append(first + at)
                position_ids[row, at:] = np.arange(s - at)
            bounds.append(first + s)
        cu_seqlens = np.asarray(bounds, dtype=np.int32)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
                "cu_seqlens": torch.from_numpy(cu_seqlens),
                "max_seqlen": torch.tensor(int(np.diff(cu_seqlens).max()), dtype=torch.int32),
                "sample_index": torch.from_numpy(ids.astype(np.int64))}

    # ------------------------------------------------------------------------------ batches
    def _samples_source(self) -> str:
        return (f"{self.blend_path} gives {self.num_samples} samples over {self.epochs} epoch(s) at seq_length "
                f"{self.seq_length}; raise epochs or train fewer steps")

    def pipeline_shape(self, micro_batch_size: int) -> Tuple[int, int]:
        """(seq_length, micro_batch_size) to give train_step: packed micro-batches run as ONE
        sequence of micro_batch_size x seq_length tokens (megatron's THD format), and that is the
        shape pipeline stages exchange."""
        return self.seq_length * micro_batch_size, 1
