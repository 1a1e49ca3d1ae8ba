"""StageData: sample contents, resume/DP invariance, stage changes without repeats, validation."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megafox.data.stage_data import StageData
from tests.data.data_helpers import gather, window_check

SEQ1, SEQ2, GBS = 64, 128, 8  # the sequence lengths of the `blends` stages


def test_samples_are_shifted_windows_of_the_raw_documents(blends, corpus_data, tmp_path):
    sd = StageData(blends["mix"], SEQ1, GBS, cache_dir=str(tmp_path / "c"))
    assert sd.num_samples == 64 and sd.stage == "mix"
    b = gather(sd, 0, sd.num_samples)
    assert torch.equal(b["sample_index"], torch.arange(sd.num_samples))
    assert b["tokens"].dtype == torch.int64 and b["labels"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and b["tokens"].shape == (sd.num_samples, SEQ1)
    assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
    assert torch.all(b["loss_mask"] == 1)
    read = window_check(sd.train_dataset, range(sd.num_samples), b["tokens"], b["labels"], corpus_data["raw"], SEQ1)
    assert set(read) == {corpus_data["code"], corpus_data["prose"]}  # both sources are drawn
    assert read == {k: set(v.tolist()) for k, v in sd.documents_read(sd.num_samples).items()}
    eos = sd.tokenizer.eos_id
    assert (b["tokens"] == eos).any()  # windows cross document boundaries

    masked = StageData(blends["mix"], SEQ1, GBS, cache_dir=str(tmp_path / "c"), eod_mask_loss=True)
    m = gather(masked, 0, 16)
    assert torch.equal(m["tokens"], b["tokens"][:16])
    assert torch.equal(m["loss_mask"], (m["tokens"] != eos).float())


def test_order_independent_of_dp_micro_batch_and_global_batch(blends, tmp_path):
    ref = StageData(blends["mix"], SEQ1, GBS, cache_dir=str(tmp_path / "a"))
    full = gather(ref, 0, 32)
    for mbs, dp in [(1, 1), (2, 2), (1, 4), (4, 2), (1, 8)]:
        got = gather(ref, 0, 32, mbs=mbs, dp=dp)
        assert torch.equal(got["sample_index"], torch.arange(32)), (mbs, dp)
        assert torch.equal(got["tokens"], full["tokens"]), (mbs, dp)
    # one global batch: the ranks' shares are disjoint, and together exactly [consumed, consumed + gbs)
    shares = [torch.cat([mb["sample_index"] for mb in ref.micro_batches(16, 2, r, 2)]) for r in range(2)]
    assert not set(shares[0].tolist()) & set(shares[1].tolist())
    assert sorted(torch.cat(shares).tolist()) == list(range(16, 24))
    assert [mb["sample_index"].tolist() for mb in ref.micro_batches(16, 2, 1, 2)] == [[18, 19], [22, 23]]
    # resume: a fresh object (other cache dir, other global batch size) continues the same order
    again = StageData(blends["mix"], SEQ1, 4, cache_dir=str(tmp_path / "b"))
    tail = gather(again, 20, 12, mbs=1, dp=2)
    assert torch.equal(tail["sample_index"], torch.arange(20, 32))
    assert torch.equal(tail["tokens"], full["tokens"][20:32])
    # the seed is what changes the order
    other = gather(StageData(blends["mix"], SEQ1, GBS, seed=7, cache_dir=str(tmp_path / "a")), 0, 32)
    assert not torch.equal(other["tokens"], full["tokens"])


def _stage_docs(sd, corpus_data, seq, count):
    b = gather(sd, 0, count)
    return window_check(sd.train_dataset, range(count), b["tokens"], b["labels"], corpus_data["raw"], seq)


def test_stage_change_never_rereads_documents(blends, corpus_data, tmp_path):
    cache = str(tmp_path / "cache")
    code = corpus_data["code"]
    used1 = 72  # stage 1 stopped after 9 global batches
    s1 = StageData(blends["s1"], SEQ1, GBS, cache_dir=cache)
    read1 = _stage_docs(s1, corpus_data, SEQ1, used1)
    assert set(read1) == {code} and len(read1[code]) > 20

    # Megatron's plain behaviour (no previous stages) re-reads stage 1's documents: issue #1002
    naive = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache)
    assert _stage_docs(naive, corpus_data, SEQ2, naive.num_samples)[code] & read1[code]

    s2 = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache, previous_stages=[(blends["s1"], used1, SEQ1)])
    assert set(s2.excluded_documents[code].tolist()) == read1[code]
    read2 = _stage_docs(s2, corpus_data, SEQ2, s2.num_samples)  # every stage-2 sample, well-formed
    assert read2[code] and not read2[code] & read1[code]
    # the same previous stage given the trainer's way (a dict) is the same stage
    s2d = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache, previous_stages=[
        {"blend": blends["s1"], "seq_length": SEQ1, "global_batch_size": GBS, "consumed_samples": used1}])
    assert torch.equal(gather(s2d, 0, 16)["tokens"], gather(s2, 0, 16)["tokens"])

    used2 = 32
    read2 = _stage_docs(s2, corpus_data, SEQ2, used2)
    s3 = StageData(blends["s3"], 256, GBS, cache_dir=cache,
                   previous_stages=[(blends["s1"], used1, SEQ1), (blends["s2"], used2, SEQ2)])
    read3 = _stage_docs(s3, corpus_data, 256, s3.num_samples)
    for prefix, docs in read3.items():
        assert not docs & (read1.get(prefix, set()) | read2.get(prefix, set())), prefix


def test_validation_split_is_held_out_in_every_stage(blends, corpus_data, tmp_path):
    cache = str(tmp_path / "cache")
    s1 = StageData(blends["mix"], SEQ1, GBS, cache_dir=cache, valid_fraction=0.05)
    s2 = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache, valid_fraction=0.05,
                   previous_stages=[(blends["mix"], 40, SEQ1)])
    for sd in (s1, s2):
        valid = {ds.dataset_path: set(np.asarray(ds.document_index).tolist()) for ds in sd.valid_dataset.datasets}
        train = {ds.dataset_path: set(np.asarray(ds.document_index).tolist()) for ds in sd.train_dataset.datasets}
        n_code = len(corpus_data["raw"][corpus_data["code"]])
        assert valid[corpus_data["code"]] == set(range(n_code - 20, n_code))  # round(0.05 * 400)
        for prefix in valid:
            assert not valid[prefix] & train[prefix]
        assert sd.num_valid_samples >= GBS
        got = []
        for start in range(0, sd.num_valid_samples + GBS, GBS):
            batches = [list(sd.valid_micro_batches(start, 2, r, 2)) for r in range(2)]
            if start + GBS > sd.num_valid_samples:
                assert batches == [[], []]
                continue
            for r in range(2):
                got += [mb for mb in batches[r]]
        ids = torch.cat([mb["sample_index"] for mb in got])
        assert sorted(ids.tolist()) == list(range(sd.num_valid_samples // GBS * GBS))
        tokens = torch.cat([mb["tokens"] for mb in got])
        labels = torch.cat([mb["labels"] for mb in got])
        order = torch.argsort(ids)
        window_check(sd.valid_dataset, ids[order].tolist(), tokens[order], labels[order], corpus_data["raw"],
                     sd.seq_length)
    off = StageData(blends["mix"], SEQ1, GBS, cache_dir=cache, valid_fraction=0)
    assert off.valid_dataset is None and list(off.valid_micro_batches(0, 1, 0, 1)) == []
    train_off = {ds.dataset_path: len(ds.indices) for ds in off.train_dataset.datasets}
    assert train_off[corpus_data["code"]] == len(corpus_data["raw"][corpus_data["code"]])


def test_tokenizer_info_and_vocab_check(blends, tmp_path):
    sd = StageData(blends["mix"], SEQ1, GBS, cache_dir=str(tmp_path / "c"))
    t = sd.tokenizer
    assert (t.vocab_size, t.eos_id, t.bos_id, t.pad_id, t.unk_id) == (1000, 2, 1, 3, 0)
    sd.check_vocab(1024)
    sd.check_vocab(1000)
    with pytest.raises(ValueError, match=r"model.vocab_size: 512 .*\(1000\).*tokenizer.model"):
        sd.check_vocab(512)


def test_default_cache_dir_sits_next_to_the_blend(blends):
    sd = StageData(blends["mix"], SEQ1, GBS)
    assert sd.cache_dir == os.path.join(os.path.dirname(blends["mix"]), ".cache")
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(sd.cache_dir))


def test_document_lengths_are_the_mapped_idx_not_a_copy(blends):
    """Every rank reads the blend: its per-document lengths must be the .idx's own int32 array,
    mapped read-only (shared page cache), equal to megatron-core's reading of the same file."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megafox.data.blend import read_blend

    for entry in read_blend(blends["mix"]).datasets:
        assert isinstance(entry.lengths, np.memmap) and entry.lengths.dtype == np.int32
        assert not entry.lengths.flags.writeable and not entry.lengths.flags.owndata
        assert np.array_equal(entry.lengths, IndexedDataset(entry.prefix).sequence_lengths)


def test_token_counts_of_document_selections_equal_a_plain_sum():
    from megafox.data.stage_data import _tokens

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2**31 - 1, size=1000, dtype=np.int64).astype(np.int32)  # sums far past int32
    for ids in (np.arange(0, 1000), np.arange(10, 400), np.sort(rng.choice(1000, 300, replace=False)),
                np.array([7]), np.array([], dtype=np.int32)):
        ids = ids.astype(np.int32)
        assert _tokens(lengths, ids, step=64) == sum(int(lengths[i]) for i in ids)
