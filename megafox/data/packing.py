"""Packing variable-length conversations into sequences of a fixed capacity.

`pack(lengths, capacity, window)` is best-fit decreasing inside consecutive windows of `window`
items: each window's items are taken longest first and each goes into the open sequence whose
free space fits it most tightly (a new sequence when none fits).  Windows keep the cost and the
reordering bounded: an item only ever shares a sequence with items that were near it in the input
order, so a shuffled input stays shuffled at the scale of a window, and the sequences of one
window are closed before the next window starts.  The result is deterministic: the same lengths
give the same plan on every machine.

Best-fit decreasing, like first-fit decreasing, needs at most 11/9 OPT + O(1) sequences per
window (Johnson 1973); bench/packing.py measures the fill on conversation-like length
distributions.  The open sequences are kept in buckets by free space, with a
sorted list of the non-empty buckets, so placing an item costs one bisect over at most
`capacity` distinct values: O(n log capacity) for the whole input.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

DEFAULT_WINDOW = 8192


@dataclass(frozen=True)
class PackPlan:
    """Sequence s holds the items order[offsets[s]:offsets[s + 1]] (indices into the input)."""

    order: np.ndarray  # int64, a permutation of the input's non-empty items
    offsets: np.ndarray  # int64, len = sequences + 1, offsets[0] = 0

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1


def pack(lengths: np.ndarray, capacity: int, window: int = DEFAULT_WINDOW) -> PackPlan:
    """Pack items of the given lengths into sequences of at most `capacity` tokens.

    Items of length 0 are left out (they hold no token).  An item longer than `capacity` is a
    ValueError: the caller names the data it came from.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity < 1 or window < 1:
        raise ValueError(f"capacity and window must be >= 1, got {capacity}, {window}")
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {int(lengths.max())} tokens does not fit a sequence of {capacity}")
    order: List[np.ndarray] = []
    sizes: List[int] = []
    for start in range(0, len(lengths), window):
        part = lengths[start:start + window]
        keep = np.flatnonzero(part > 0)
        # longest first; ties keep input order, so the plan does not depend on the sort's whims
        by_length = keep[np.argsort(-part[keep], kind="stable")]
        for members in _best_fit(part[by_length].tolist(), capacity):
            order.append(start + by_length[members])
            sizes.append(len(members))
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.concatenate(order).astype(np.int64) if order else np.zeros(0, dtype=np.int64)
    return PackPlan(flat, offsets)


def _best_fit(lengths: List[int], capacity: int) -> List[List[int]]:
    """Best fit over items already sorted longest first; returns each sequence's item positions."""
    sequences: List[List[int]] = []
    free_values: List[int] = []  # sorted distinct free space of the open sequences
    open_with: Dict[int, List[int]] = {}  # free space -> open sequences with exactly that much
    for item, length in enumerate(lengths):
        k = bisect_left(free_values, length)
        if k == len(free_values):
            seq = len(sequences)
            sequences.append([item])
            free = capacity - length
        else:
            space = free_values[k]
            candidates = open_with[space]
            seq = candidates.pop()
            if not candidates:
                del open_with[space]
                free_values.pop(k)
            sequences[seq].append(item)
            free = space - length
        if free > 0:
            bucket = open_with.get(free)
            if bucket is None:
                open_with[free] = [seq]
                insort(free_values, free)
            else:
                bucket.append(seq)
    return sequences


def permute_sequences(plan: PackPlan, permutation: np.ndarray) -> PackPlan:
    """The same sequences in the order `permutation` (new sequence i = old sequence permutation[i])."""
    counts = np.diff(plan.offsets)[permutation]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    starts = plan.offsets[:-1][permutation]
    gather = np.repeat(starts - offsets[:-1], counts) + np.arange(int(offsets[-1]), dtype=np.int64)
    return PackPlan(plan.order[gather], offsets)
