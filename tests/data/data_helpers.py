"""Independent readers of megafox.data's samples for the tests (the data itself is built with
tests.support): `window_check` recomputes each sample from the raw document tokens the test wrote
(not from the .bin file nor megatron's sample index) and returns the documents it spans."""
from __future__ import annotations

import numpy as np


def mid_level(train, ids):
    """(GPTDataset, its local sample id) for stage-global sample ids."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    if isinstance(train, BlendedDataset):
        return [(train.datasets[int(train.dataset_index[i])], int(train.dataset_sample_index[i])) for i in ids]
    return [(train, int(i)) for i in ids]


def window_check(train, ids, tokens, labels, raw_docs, seq):
    """Assert every sample is seq+1 consecutive tokens of its GPTDataset's document stream (the
    raw documents concatenated in megatron's document order); return {prefix: set(documents)}."""
    streams = {}
    read = {}
    for (ds, local), tok, lab in zip(mid_level(train, ids), tokens, labels):
        key = id(ds)
        if key not in streams:
            docs = raw_docs[ds.dataset_path]
            order = np.asarray(ds.document_index)
            lengths = np.array([len(docs[d]) for d in order])
            streams[key] = (np.concatenate([docs[d] for d in order]), np.cumsum(lengths), order)
        stream, ends, order = streams[key]
        row = int(ds.shuffle_index[local])
        start, last = row * seq, row * seq + seq  # seq + 1 tokens: [start, last]
        window = stream[start:last + 1]
        assert len(window) == seq + 1
        assert np.array_equal(np.asarray(tok), window[:-1]), f"sample {local} tokens differ from the raw data"
        assert np.array_equal(np.asarray(lab), window[1:]), f"sample {local} labels are not tokens shifted by one"
        first, final = np.searchsorted(ends, start, "right"), np.searchsorted(ends, last, "right")
        read.setdefault(ds.dataset_path, set()).update(int(d) for d in order[first:final + 1])
    return read


def gather(stage_data, start, count, mbs=None, dp=1):
    """tokens, labels, loss_mask, sample ids of global batches covering [start, start + count)."""
    gbs = stage_data.global_batch_size
    mbs = mbs or gbs // dp
    out = {"tokens": [], "labels": [], "loss_mask": [], "sample_index": []}
    for c in range(start, start + count, gbs):
        for r in range(dp):
            for mb in stage_data.micro_batches(c, mbs, r, dp):
                for k in out:
                    out[k].append(mb[k])
    import torch

    out = {k: torch.cat(v) for k, v in out.items()}
    order = torch.argsort(out["sample_index"])
    return {k: v[order] for k, v in out.items()}


def reference_documents_read(train, num_samples):
    """{prefix: sorted int64 document ids} that samples [0, num_samples) of megatron's training
    dataset read, computed as megafox did before the documents-read record (np.add.at over
    document-index positions, then np.unique): the reference the record must equal bit for bit."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    def documents_of(ds, local_ids):
        if len(local_ids) == 0:
            return np.zeros(0, dtype=np.int64)
        rows = np.asarray(ds.shuffle_index)[local_ids].astype(np.int64)
        sample_index = np.asarray(ds.sample_index)
        beg, end = sample_index[rows, 0].astype(np.int64), sample_index[rows + 1, 0].astype(np.int64)
        cover = np.zeros(len(ds.document_index) + 1, dtype=np.int64)
        np.add.at(cover, beg, 1)
        np.add.at(cover, end + 1, -1)
        return np.unique(np.asarray(ds.document_index)[np.cumsum(cover)[:-1] > 0]).astype(np.int64)

    ids = np.arange(num_samples, dtype=np.int64)
    if isinstance(train, BlendedDataset):
        which = np.asarray(train.dataset_index)[ids]
        local = np.asarray(train.dataset_sample_index)[ids]
        parts = [(ds, local[which == k]) for k, ds in enumerate(train.datasets)]
    else:
        parts = [(train, ids)]
    return {ds.dataset_path: documents_of(ds, np.asarray(sel, dtype=np.int64)) for ds, sel in parts}


def reference_union(a, b):
    out = dict(a)
    for prefix, docs in b.items():
        out[prefix] = np.union1d(out.get(prefix, np.zeros(0, np.int64)), docs)
    return out
