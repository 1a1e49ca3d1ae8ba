"""Test datasets in Megatron's indexed format (PREFIX.bin/.idx, one sequence per document, written
with megatron-core's own IndexedDatasetBuilder as data_prep writes them), SFT datasets (tokens +
uint8 loss masks of the same lengths), and the blend.json files of the data_prep contract that
name them (paths relative to the blend's directory)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def write_indexed(prefix, documents: Sequence[Sequence[int]], dtype=np.uint16) -> str:
    """<prefix>.bin/.idx holding `documents`; returns the prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in documents:
        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def read_indexed(prefix):
    """(every document as a list of ids, the IndexedDataset) as megatron-core reads <prefix>."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))], dataset


def write_blend(path, tokenizer, datasets: Sequence[Tuple[str, float]], token_budget: int, stage: str = "stage",
                extra: Optional[dict] = None, *, counts: bool = False) -> str:
    """A pretraining stage's blend.json; datasets: [(prefix, weight)]. `counts`: each entry also
    states its documents and tokens (as data_prep.plan writes them; the trainer checks them)."""
    base = os.path.dirname(str(path))
    entries = []
    for prefix, weight in datasets:
        entry = {"prefix": os.path.relpath(prefix, base), "weight": weight}
        if counts:
            lengths = _lengths(prefix)
            entry.update(documents=len(lengths), tokens=int(lengths.sum()))
        entries.append(entry)
    blend = {"stage": stage, "tokenizer": os.path.relpath(tokenizer, base), "datasets": entries,
             "token_budget": token_budget}
    return _write_json(path, dict(blend, **(extra or {})))


# ----------------------------------------------------------------------------------------- SFT
def synthetic_conversations(n: int, min_len: int, max_len: int, vocab: int, seed: int,
                            eot: int = 2) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """n conversations of random ids in [4, vocab): alternating user / assistant turns, each turn
    ending with `eot`; mask 1 on assistant turns (content + eot). Lengths uniform in [min, max]."""
    rng = np.random.default_rng(seed)
    convs, masks = [], []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(4, vocab, size=length).astype(np.int64)
        mask = np.zeros(length, dtype=np.uint8)
        at, assistant = 0, False
        while at < length:
            turn = int(rng.integers(2, 9))
            end = min(length, at + turn)
            ids[end - 1] = eot
            mask[at:end] = assistant
            at, assistant = end, not assistant
        convs.append(ids)
        masks.append(mask)
    return convs, masks


def write_sft_dataset(prefix, convs: Sequence[np.ndarray], masks: Sequence[np.ndarray], dtype=np.uint16) -> str:
    """PREFIX.bin/.idx (one conversation per sequence) + PREFIX.mask.bin/.idx (uint8, 1 on the
    tokens trained on); returns the prefix's real path."""
    write_indexed(prefix, convs, dtype)
    write_indexed(str(prefix) + ".mask", masks, np.uint8)
    return os.path.realpath(prefix)


def write_sft_blend(path, tokenizer, datasets: Sequence[Tuple[str, float]], seq_length: int,
                    extra: Optional[dict] = None) -> str:
    """An SFT stage's blend.json ("kind": "sft"); datasets: [(prefix, weight)], masks at prefix.mask."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    base = os.path.dirname(str(path))
    entries = []
    for prefix, weight in datasets:
        lengths = _lengths(prefix)
        masks = IndexedDataset(prefix + ".mask", mmap=True)
        entries.append({"prefix": os.path.relpath(prefix, base), "mask_prefix": os.path.relpath(prefix + ".mask", base),
                        "weight": weight, "documents": len(lengths), "tokens": int(lengths.sum()),
                        "trained_tokens": int(sum(int(masks.get(i).sum()) for i in range(len(masks))))})
    blend = {"kind": "sft", "stage": "sft", "tokenizer": os.path.relpath(tokenizer, base), "seq_length": seq_length,
             "chat_template": "<|user|>\n{msg}<eos><|assistant|>\n{msg}<eos>", "datasets": entries}
    return _write_json(path, dict(blend, **(extra or {})))


def _lengths(prefix) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    return np.array(dataset.sequence_lengths, dtype=np.int64)  # a copy: the dataset unmaps its index when collected


def _write_json(path, content: Dict) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
    return path
