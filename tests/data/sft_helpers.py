"""SFT test data written to the data_prep contract (until data_prep's SFT side lands): per dataset
PREFIX.bin/.idx (one conversation per sequence) + PREFIX.mask.bin/.idx (uint8, same lengths,
1 on assistant tokens and their end-of-turn), and a blend.json with "kind": "sft".

Also an independent reader of packed micro-batches: `segments_of(batch)` cuts every row by its
cu_seqlens and `identify` maps each segment back to the raw conversation the test wrote, so the
tests check SFTData against the data itself, not against its own plan."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np


def train_tokenizer(out_dir: str, vocab_size: int = 1000) -> str:
    """A SentencePiece BPE model (unk 0, bos 1, eos 2, pad 3) trained on some stdlib sources."""
    import glob
    import sysconfig

    import sentencepiece as spm

    stdlib = sysconfig.get_paths()["stdlib"]
    text = "\n".join(open(p, encoding="utf-8", errors="replace").read()
                     for p in sorted(glob.glob(os.path.join(stdlib, "json", "*.py"))))
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(text)
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, num_threads=1)
    return os.path.join(out_dir, "tokenizer.model")


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


def write_sft_dataset(prefix: str, convs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                      dtype=np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    for path, items, kind in ((prefix, convs, dtype), (prefix + ".mask", masks, np.uint8)):
        builder = IndexedDatasetBuilder(path + ".bin", dtype=kind)
        for item in items:
            builder.add_document(np.asarray(item, dtype=np.int64), [len(item)])
        builder.finalize(path + ".idx")
    return os.path.realpath(prefix)


def write_sft_blend(path: str, tokenizer: str, datasets: Sequence[Tuple[str, float]], seq_length: int,
                    extra: dict = None) -> str:
    """datasets: [(prefix, weight)]; mask_prefix = prefix + '.mask'; paths relative to the blend."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = str(path)
    base = os.path.dirname(path)
    os.makedirs(base, exist_ok=True)
    entries = []
    for prefix, weight in datasets:
        tokens = IndexedDataset(prefix, mmap=True)
        masks = IndexedDataset(prefix + ".mask", mmap=True)
        entries.append({"prefix": os.path.relpath(prefix, base), "mask_prefix": os.path.relpath(prefix + ".mask", base),
                        "weight": weight, "documents": len(tokens),
                        "tokens": int(np.asarray(tokens.sequence_lengths).sum()),
                        "trained_tokens": int(sum(int(masks.get(i).sum()) for i in range(len(masks))))})
    blend = {"kind": "sft", "stage": "sft", "tokenizer": os.path.relpath(tokenizer, base), "seq_length": seq_length,
             "chat_template": "<|user|>\n{msg}<eos><|assistant|>\n{msg}<eos>", "datasets": entries}
    blend.update(extra or {})
    with open(path, "w") as f:
        json.dump(blend, f)
    return path


# ---------------------------------------------------------------------------------- reading back
def segments_of(batch) -> List[List[Tuple[int, int]]]:
    """Per row, the (start, end) column ranges of its segments, from the batch's cu_seqlens."""
    b, s = batch["tokens"].shape
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == b * s and all(x < y for x, y in zip(cu, cu[1:])), cu
    rows = [[] for _ in range(b)]
    for start, end in zip(cu[:-1], cu[1:]):
        row = start // s
        assert (end - 1) // s == row, f"segment [{start}, {end}) crosses a row boundary"
        rows[row].append((start - row * s, end - row * s))
    for row in range(b):
        assert row * s in cu, f"row {row} does not start a segment"
    assert int(batch["max_seqlen"]) == max(y - x for x, y in zip(cu, cu[1:]))
    return rows


def conversation_index(raw: Dict[str, Sequence[np.ndarray]]) -> Dict[bytes, Tuple[str, int]]:
    """Raw token content -> (prefix, conversation id); the synthetic conversations are unique."""
    index = {}
    for prefix, convs in raw.items():
        for i, ids in enumerate(convs):
            key = np.asarray(ids, dtype=np.int64).tobytes()
            assert key not in index, "test conversations must be unique"
            index[key] = (prefix, i)
    return index


def check_rows(batch, index, raw_masks, pad_id) -> List[List[Tuple[str, int]]]:
    """Assert every row is whole conversations then padding, with labels, loss_mask and
    position_ids as the contract says; return the conversations of each row."""
    out = []
    tokens, labels = batch["tokens"].numpy(), batch["labels"].numpy()
    loss_mask, positions = batch["loss_mask"].numpy(), batch["position_ids"].numpy()
    for row, segments in enumerate(segments_of(batch)):
        found = []
        for n, (a, b) in enumerate(segments):
            assert np.array_equal(positions[row, a:b], np.arange(b - a)), "positions must restart per segment"
            key = tokens[row, a:b].astype(np.int64).tobytes()
            if key in index:
                prefix, conv = index[key]
                mask = np.asarray(raw_masks[prefix][conv])
                assert np.array_equal(labels[row, a:b - 1], tokens[row, a + 1:b]), "labels = tokens shifted by one"
                assert np.array_equal(loss_mask[row, a:b - 1], mask[1:].astype(np.float32)), \
                    "input t is trained iff mask[t + 1] = 1"
                assert loss_mask[row, b - 1] == 0, "a conversation's last position predicts nothing"
                found.append((prefix, conv))
            else:  # only the row's tail may be padding
                assert n == len(segments) - 1 and b == tokens.shape[1], f"row {row}: segment {a}:{b} is no conversation"
                assert (tokens[row, a:b] == pad_id).all() and (loss_mask[row, a:b] == 0).all()
        out.append(found)
    return out
