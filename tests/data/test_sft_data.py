"""SFTData: packed conversations with one global order.

Every batch is read back independently (`tests/data/sft_helpers.check_rows`): each row is cut by its
cu_seqlens and each segment matched to the raw conversation the test wrote, with labels,
loss_mask and position_ids recomputed from the raw tokens and masks."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from megafox.data.blend import DataError
from megafox.data.packing import pack, permute_sequences
from megafox.data.sft_data import SFTData
from tests.data.sft_helpers import check_rows, conversation_index
from tests.support.indexed import synthetic_conversations, write_sft_blend, write_sft_dataset
from tests.support.processes import REPO, run_python

SEQ, PAD = 64, 3


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    chat, chat_masks = synthetic_conversations(150, 3, 60, 1000, seed=1)
    code, code_masks = synthetic_conversations(90, 2, 30, 1000, seed=2)
    chat_p = write_sft_dataset(str(root / "data" / "chat"), chat, chat_masks)
    code_p = write_sft_dataset(str(root / "data" / "code"), code, code_masks)
    raw = {chat_p: chat, code_p: code}
    return {"root": root, "chat": chat_p, "code": code_p, "raw": raw, "masks": {chat_p: chat_masks, code_p: code_masks},
            "index": conversation_index(raw)}


def _train_count(n, valid_fraction):
    return n - (min(n - 1, max(1, round(valid_fraction * n))) if valid_fraction > 0 else 0)


def _blend(sft_corpus, tok_model, name, weights, **extra):
    datasets = [(sft_corpus["chat"], weights[0]), (sft_corpus["code"], weights[1])]
    return write_sft_blend(str(sft_corpus["root"] / name / "blend.json"), tok_model, datasets, SEQ, extra)


def _read_all(data, corpus, start, count, mbs=2, dp=1, valid=False):
    """{sample id: (batch row dict, conversations)} for global batches covering [start, start + count)."""
    out = {}
    for c in range(start, start + count, data.global_batch_size):
        for r in range(dp):
            reader = data.valid_micro_batches if valid else data.micro_batches
            for mb in reader(c, mbs, r, dp):
                rows = check_rows(mb, corpus["index"], corpus["masks"], PAD)
                for i, sample in enumerate(mb["sample_index"].tolist()):
                    assert sample not in out
                    row = {k: mb[k][i] for k in ("tokens", "labels", "loss_mask", "position_ids")}
                    out[sample] = (row, rows[i])
    return out


@pytest.fixture(scope="module")
def natural(sft_corpus, tok_model):
    """Weights = the training conversation counts: every conversation once per epoch."""
    f = 0.05
    weights = [_train_count(150, f), _train_count(90, f)]
    blend = _blend(sft_corpus, tok_model, "natural", weights)
    cache = str(sft_corpus["root"] / "natural_cache")
    data = SFTData(blend, SEQ, 4, seed=7, epochs=3, valid_fraction=f, cache_dir=cache)
    return {"blend": blend, "cache": cache, "data": data, "all": _read_all(data, sft_corpus, 0, data.num_samples)}


def test_every_training_conversation_once_per_epoch_and_held_out_never(natural, sft_corpus):
    data, read = natural["data"], natural["all"]
    chat, code = sft_corpus["chat"], sft_corpus["code"]
    train = {(chat, i) for i in range(_train_count(150, 0.05))} | {(code, i) for i in range(_train_count(90, 0.05))}
    assert sorted(read) == list(range(data.num_samples))
    at = 0
    for epoch, stats in enumerate(data.epoch_stats):
        seen = Counter(conv for k in range(at, at + stats.sequences) for conv in read[k][1])
        assert set(seen) == train and set(seen.values()) == {1}, f"epoch {epoch}"
        at += stats.sequences
    assert at == data.num_real_samples
    # the last global batch is completed with rows of padding only (none dropped)
    padded = SFTData(natural["blend"], SEQ, 7, seed=7, epochs=3, valid_fraction=0.05, cache_dir=natural["cache"])
    assert padded.num_samples == -(-data.num_real_samples // 7) * 7 > data.num_real_samples
    last = padded.num_samples - 7
    tail = _read_all(padded, sft_corpus, last, 7, mbs=1)
    for k, (row, convs) in tail.items():
        if k < data.num_real_samples:
            assert convs == read[k][1]
        else:
            assert convs == [] and (row["tokens"] == PAD).all() and (row["loss_mask"] == 0).all()
    valid = _read_all(data, sft_corpus, 0, data.num_valid_samples, valid=True)
    held_out = Counter(conv for _, convs in valid.values() for conv in convs)
    assert set(held_out) == {(chat, i) for i in range(_train_count(150, 0.05), 150)} | \
        {(code, i) for i in range(_train_count(90, 0.05), 90)}
    assert set(held_out.values()) == {1}
    assert list(data.valid_micro_batches(data.num_valid_samples, 2, 0, 1)) == []


def test_packing_efficiency_is_real_tokens_over_capacity(natural, sft_corpus):
    data, read = natural["data"], natural["all"]
    real = sum(int((row["tokens"] != PAD).sum()) for k, (row, _) in read.items() if k < data.num_real_samples)
    assert data.packing_efficiency == pytest.approx(real / (data.num_real_samples * SEQ), rel=1e-12)
    # conversations of 2-60 tokens in rows of 64: best-fit decreasing leaves little room
    assert data.packing_efficiency > 0.95
    train = [len(c) for prefix, n in ((sft_corpus["chat"], 150), (sft_corpus["code"], 90))
             for c in sft_corpus["raw"][prefix][:_train_count(n, 0.05)]]
    assert data.epoch_stats[0].sequences < pack_sequential(train, SEQ)


def pack_sequential(lengths, capacity):
    """Sequences a greedy fill in input order needs (the baseline packing must beat)."""
    count, free = 0, 0
    for n in lengths:
        if n > free:
            count, free = count + 1, capacity
        free -= n
    return count


@pytest.mark.parametrize("dp,mbs", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_same_global_order_at_any_dp_size_and_micro_batch_size(natural, sft_corpus, dp, mbs):
    data, ref = natural["data"], natural["all"]
    got = _read_all(data, sft_corpus, 0, 3 * data.global_batch_size, mbs=mbs, dp=dp)
    assert sorted(got) == list(range(3 * data.global_batch_size))
    for k, (row, convs) in got.items():
        assert convs == ref[k][1]
        for name, tensor in row.items():
            assert torch.equal(tensor, ref[k][0][name]), (k, name)


def test_resume_from_any_consumed_samples_continues_the_same_samples(natural, sft_corpus):
    data, ref = natural["data"], natural["all"]
    cache = natural["cache"]
    files = {p: os.path.getmtime(os.path.join(cache, p)) for p in os.listdir(cache) if p.endswith(".npy")}
    # a new process (same cache) at another global batch size, resumed mid-run
    again = SFTData(natural["blend"], SEQ, 8, seed=7, epochs=3, valid_fraction=0.05, cache_dir=cache)
    assert {p: os.path.getmtime(os.path.join(cache, p)) for p in os.listdir(cache) if p.endswith(".npy")} == files
    assert again.num_real_samples == data.num_real_samples
    for consumed in (0, 8, 24, 40):
        got = _read_all(again, sft_corpus, consumed, 8, mbs=2, dp=2)
        for k, (row, convs) in got.items():
            if k < data.num_real_samples:
                assert convs == ref[k][1] and torch.equal(row["tokens"], ref[k][0]["tokens"])
    with pytest.raises(DataError, match="past its end"):
        next(again.micro_batches(again.num_samples, 2, 0, 1))


def test_a_different_seed_gives_another_order(natural):
    other = SFTData(natural["blend"], SEQ, 4, seed=8, epochs=1, valid_fraction=0.05, cache_dir=natural["cache"])
    first = [other.conversations_of(k) for k in range(8)]
    assert first != [natural["all"][k][1] for k in range(8)]


def test_weights_set_each_datasets_share_and_repeat_it_evenly(sft_corpus, tok_model, tmp_path):
    blend = _blend(sft_corpus, tok_model, "weighted", [3.0, 1.0])
    data = SFTData(blend, SEQ, 4, seed=1, epochs=2, valid_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    read = _read_all(data, sft_corpus, 0, data.num_samples)
    chat, code = sft_corpus["chat"], sft_corpus["code"]
    per_epoch = (150 + 90) * np.array([3, 1]) / 4  # 180 chat, 60 code draws per epoch
    at = 0
    counts = {chat: Counter(), code: Counter()}
    for epoch, stats in enumerate(data.epoch_stats):
        for k in range(at, at + stats.sequences):
            for prefix, conv in read[k][1]:
                counts[prefix][conv] += 1
        at += stats.sequences
        for prefix, n, share in ((chat, 150, per_epoch[0]), (code, 90, per_epoch[1])):
            drawn = share * (epoch + 1)
            assert sum(counts[prefix].values()) == drawn
            # a dataset's conversations repeat only after all of them were drawn: counts differ by <= 1
            per_conv = [counts[prefix][i] for i in range(n)]
            assert max(per_conv) - min(per_conv) <= 1 and min(per_conv) == drawn // n, (prefix, epoch)


def test_plans_are_cached_per_epoch_and_a_bad_cache_file_is_refused(sft_corpus, tok_model, tmp_path):
    blend = _blend(sft_corpus, tok_model, "cached", [1.0, 1.0])
    cache = tmp_path / "cache"
    one = SFTData(blend, SEQ, 4, seed=1, epochs=1, valid_fraction=0.0, cache_dir=str(cache))
    first = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(first) == 2 and all("-train-e0000-" in name for name in first)
    two = SFTData(blend, SEQ, 4, seed=1, epochs=2, valid_fraction=0.0, cache_dir=str(cache))
    assert all(cache.joinpath(n).stat().st_mtime_ns == t for n, t in first.items())  # epoch 0 reused
    assert [two.conversations_of(k) for k in range(one.num_real_samples)] == \
        [one.conversations_of(k) for k in range(one.num_real_samples)]
    target = next(p for p in cache.glob("*-train-e0001-sequences.npy"))
    target.write_bytes(b"\x80\x04not an array")  # a pickle stream, never loaded
    with pytest.raises(DataError, match="delete it to rebuild"):
        SFTData(blend, SEQ, 4, seed=1, epochs=2, valid_fraction=0.0, cache_dir=str(cache))


# ------------------------------------------------------------------------------ bad input
def _rewrite(blend, **changes):
    raw = json.load(open(blend))
    for key, value in changes.items():
        if key.startswith("ds0_"):
            raw["datasets"][0][key[4:]] = value
        elif value is None:
            raw.pop(key)
        else:
            raw[key] = value
    json.dump(raw, open(blend, "w"))
    return blend


def test_bad_input_is_one_line_naming_the_field(sft_corpus, tok_model, tmp_path):
    make = lambda name: _blend(sft_corpus, tok_model, name, [1.0, 1.0])  # noqa: E731
    cases = [
        (lambda: SFTData(make("long"), 40, 4, cache_dir=str(tmp_path)),
         r"datasets\[0\]\.prefix: .*chat has \d+ conversation\(s\) longer than seq_length 40"),
        (lambda: SFTData(_rewrite(make("kind"), kind=None), SEQ, 4, cache_dir=str(tmp_path)), r"field 'kind' is None"),
        (lambda: SFTData(_rewrite(make("pre"), kind="pretrain"), SEQ, 4, cache_dir=str(tmp_path)), "StageData"),
        (lambda: SFTData(_rewrite(make("nomask"), ds0_mask_prefix="nowhere"), SEQ, 4, cache_dir=str(tmp_path)),
         r"datasets\[0\]\.mask_prefix: .*nowhere\.idx does not exist"),
        (lambda: SFTData(make("gbs"), SEQ, 0), "global_batch_size"),
        (lambda: SFTData(make("epochs"), SEQ, 4, epochs=0, cache_dir=str(tmp_path)), "epochs"),
    ]
    for build, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            build()
    # masks of another dataset: the lengths differ
    blend = make("othermask")
    raw = json.load(open(blend))
    raw["datasets"][0]["mask_prefix"] = raw["datasets"][1]["mask_prefix"]
    json.dump(raw, open(blend, "w"))
    with pytest.raises(DataError, match=r"datasets\[0\]\.mask_prefix: .*does not match its tokens"):
        SFTData(blend, SEQ, 4, cache_dir=str(tmp_path))
    data = SFTData(make("ok"), SEQ, 4, valid_fraction=0.0, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="not divisible"):
        next(data.micro_batches(0, 3, 0, 1))
    with pytest.raises(DataError, match="dp_rank"):
        next(data.micro_batches(0, 1, 2, 2))
    with pytest.raises(DataError, match="model.vocab_size"):
        data.check_vocab(500)


# ------------------------------------------------------------------------------ packing
def test_pack_places_every_item_once_within_capacity_and_window():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 300, 5000), [0, 0, 512, 512]])
    rng.shuffle(lengths)
    plan = pack(lengths, 512, window=1000)
    assert sorted(plan.order.tolist()) == sorted(np.flatnonzero(lengths > 0).tolist())  # empty ones left out
    sums = np.add.reduceat(lengths[plan.order], plan.offsets[:-1])
    assert sums.max() <= 512 and plan.offsets[0] == 0 and plan.offsets[-1] == len(plan.order)
    for s in range(plan.num_sequences):
        members = plan.order[plan.offsets[s]:plan.offsets[s + 1]]
        assert len(set((members // 1000).tolist())) == 1, "a sequence mixes two windows"
    again = pack(lengths, 512, window=1000)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.offsets, again.offsets)
    assert plan.num_sequences < pack_sequential(lengths[lengths > 0], 512)
    assert lengths.sum() / (plan.num_sequences * 512) > 0.98
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([3, 513]), 512)


def test_permute_sequences_moves_whole_sequences():
    plan = pack(np.array([5, 4, 3, 2, 6, 1]), 7, window=10)
    perm = np.arange(plan.num_sequences)[::-1].copy()
    moved = permute_sequences(plan, perm)
    for new, old in enumerate(perm):
        assert moved.order[moved.offsets[new]:moved.offsets[new + 1]].tolist() == \
            plan.order[plan.offsets[old]:plan.offsets[old + 1]].tolist()


@pytest.mark.slow
def test_packing_bench_prints_its_tables(tmp_path):
    """bench/packing.py --quick end to end: the tables, and packing beating a greedy fill."""
    proc = run_python(REPO / "bench" / "packing.py", "--quick", "--json", tmp_path / "packing.json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "packing.json").read_text())
    for dist in ("mean~1K", "mean~2.5K"):
        rows = {r["algorithm"]: r for r in results["algorithms"] if r["lengths"] == dist}
        assert rows["best-fit decr., window 8192"]["efficiency"] > 0.99 > rows["greedy in order"]["efficiency"]
    assert all(0.99 < r["efficiency"] <= 1 and r["sequences"] > 0 for r in results["plans"])
    assert "5B tokens" in proc.stdout and "efficiency" in proc.stdout
