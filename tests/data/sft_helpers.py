"""An independent reader of SFTData's packed micro-batches (the SFT data itself is written with
tests.support.indexed): `segments_of(batch)` cuts every row by its cu_seqlens and `check_rows`
maps each segment back to the raw conversation the test wrote (`conversation_index`), so the tests
check SFTData against the data itself, not against its own plan."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


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
