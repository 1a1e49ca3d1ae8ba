"""The documents-read record: written once at a stage's end, it gives later stages exactly the
exclusion the recomputation from consumed samples gave (bit for bit), the same samples and the
same cache files; a record that no longer matches its data, or is damaged, is refused by name."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from megafox.config import ConfigError
from megafox.data import documents_read as dr
from megafox.data.documents_read import read_documents_read, write_documents_read
from megafox.data.stage_data import StageData
from tests.data.data_helpers import gather, reference_documents_read, reference_union, window_check
from tests.support.indexed import write_blend, write_indexed

SEQ1, SEQ2, SEQ3, GBS = 64, 128, 256, 8  # the sequence lengths of the `blends` stages
USED1, USED2 = 72, 32


def _same_sets(got, want):
    assert set(got) == set(want)
    for prefix in want:
        ids = got[prefix]
        assert ids.dtype == np.int64 and np.array_equal(ids, want[prefix]), prefix


def _cache_files(path):
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def test_record_equals_the_recomputation_over_two_earlier_stages(blends, corpus_data, tmp_path):
    cache = str(tmp_path / "cache")
    s1 = StageData(blends["s1"], SEQ1, GBS, cache_dir=cache)
    # stage 1 read: the previous implementation's computation, and the raw tokens themselves
    old1 = reference_documents_read(s1.train_dataset, USED1)
    b = gather(s1, 0, USED1)
    raw1 = window_check(s1.train_dataset, range(USED1), b["tokens"], b["labels"], corpus_data["raw"], SEQ1)
    assert {k: set(v.tolist()) for k, v in old1.items()} == raw1

    rec1 = write_documents_read(s1, USED1, tmp_path / "stage1.documents")
    _same_sets(rec1, old1)
    _same_sets(read_documents_read(tmp_path / "stage1.documents"), old1)
    assert [s["stage"] for s in rec1.stages] == ["stage1"] and rec1.stages[0]["consumed_samples"] == USED1
    assert isinstance(read_documents_read(tmp_path / "stage1.documents").entries[corpus_data["code"]].bitmap, np.memmap)

    # stage 2 from the recomputation (old runs) and from the record: same exclusion, same samples, same cache
    s2_old = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache, previous_stages=[(blends["s1"], USED1, SEQ1)])
    _same_sets(s2_old.excluded_documents, old1)
    files = _cache_files(cache)
    s2 = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache,
                   excluded_documents=read_documents_read(tmp_path / "stage1.documents"))
    assert _cache_files(cache) == files  # the record path finds the indices the recomputation built
    _same_sets(s2.excluded_documents, old1)
    assert torch.equal(gather(s2, 0, s2.num_samples)["tokens"], gather(s2_old, 0, s2.num_samples)["tokens"])

    # stage 2's record is cumulative: stage 1's reads and its own
    old2 = reference_union(old1, reference_documents_read(s2.train_dataset, USED2))
    rec2 = write_documents_read(s2, USED2, tmp_path / "stage2.documents")
    _same_sets(read_documents_read(tmp_path / "stage2.documents"), old2)
    assert [s["stage"] for s in rec2.stages] == ["stage1", "stage2"]
    assert set(old2) == {corpus_data["code"], corpus_data["prose"]}

    # stage 3: one record instead of rebuilding two earlier stages
    s3_old = StageData(blends["s3"], SEQ3, GBS, cache_dir=cache,
                       previous_stages=[(blends["s1"], USED1, SEQ1), (blends["s2"], USED2, SEQ2)])
    _same_sets(s3_old.excluded_documents, old2)
    s3 = StageData(blends["s3"], SEQ3, GBS, cache_dir=cache, excluded_documents=read_documents_read(tmp_path / "stage2.documents"))
    _same_sets(s3.excluded_documents, old2)
    want, got = gather(s3_old, 0, s3.num_samples), gather(s3, 0, s3.num_samples)
    assert torch.equal(got["tokens"], want["tokens"])
    read3 = window_check(s3.train_dataset, range(s3.num_samples), got["tokens"], got["labels"], corpus_data["raw"], SEQ3)
    for prefix, docs in read3.items():
        assert not docs & set(old2[prefix].tolist()), prefix


def test_record_written_once_and_replaced_atomically(blends, tmp_path, monkeypatch):
    cache, where = str(tmp_path / "cache"), tmp_path / "stage1.documents"
    s1 = StageData(blends["s1"], SEQ1, GBS, cache_dir=cache)
    first = write_documents_read(s1, USED1, where)
    # a stage end redone after a requeue: the record is there for the same stages, nothing is recomputed
    monkeypatch.setattr(StageData, "documents_read", lambda *a: pytest.fail("recomputed an existing record"))
    again = write_documents_read(s1, USED1, where)
    assert again.stages == first.stages
    monkeypatch.undo()

    # a write killed before its documents.json lands leaves the previous record in force
    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith(dr.RECORD_FILE):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(dr.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_documents_read(s1, USED1 - 8, where)
    monkeypatch.undo()
    assert read_documents_read(where).stages == first.stages
    # the next write replaces it and removes what the killed one left
    write_documents_read(s1, USED1 - 8, where)
    assert read_documents_read(where).stages[0]["consumed_samples"] == USED1 - 8
    names = os.listdir(where)
    assert len([n for n in names if n.endswith(".bits.npy")]) == 1 and not [n for n in names if n.endswith(".tmp")]


def _refused(match, *args, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        StageData(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_record_of_a_changed_dataset_is_refused(corpus_data, tok_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    prefix = str(data / "code")
    docs = corpus_data["raw"][corpus_data["code"]]
    write_indexed(prefix, docs)
    s1b = write_blend(tmp_path / "s1" / "blend.json", tok_model, [(prefix, 1.0)], 48 * SEQ1, "stage1")
    s2b = write_blend(tmp_path / "s2" / "blend.json", tok_model, [(prefix, 1.0)], 16 * SEQ2, "stage2")
    s1 = StageData(s1b, SEQ1, GBS, cache_dir=str(tmp_path / "c"))
    where = tmp_path / "stage1.documents"
    write_documents_read(s1, 40, where)
    record = str(where / dr.RECORD_FILE)
    StageData(s2b, SEQ2, GBS, cache_dir=str(tmp_path / "c"), excluded_documents=read_documents_read(where))

    # a copy of the same data keeps its identity
    shutil.copy(prefix + ".idx", str(tmp_path / "copy.idx"))
    assert dr.idx_fingerprint(str(tmp_path / "copy")) == dr.idx_fingerprint(prefix)

    # re-preprocessed: the same number of documents and the same .idx size, other lengths
    write_indexed(prefix, docs[1:] + docs[:1])
    assert os.path.getsize(prefix + ".idx") == os.path.getsize(str(tmp_path / "copy.idx"))
    msg = _refused(r"\.idx changed since stage\(s\) stage1 recorded", s2b, SEQ2, GBS, cache_dir=str(tmp_path / "c"),
                   excluded_documents=read_documents_read(where))
    assert record in msg and prefix in msg and "datasets[0].prefix" in msg

    # fewer documents
    write_indexed(prefix, docs[:300])
    _refused(r"400 documents.* now: .* 300 documents", s2b, SEQ2, GBS, cache_dir=str(tmp_path / "c"),
             excluded_documents=read_documents_read(where))


def test_damaged_record_is_refused_without_running_it(blends, tmp_path):
    where = tmp_path / "stage1.documents"
    s1 = StageData(blends["s1"], SEQ1, GBS, cache_dir=str(tmp_path / "c"))
    write_documents_read(s1, USED1, where)
    index = json.loads((where / dr.RECORD_FILE).read_text())
    (entry,) = index["prefixes"].values()
    bits = where / entry["file"]
    good = bits.read_bytes()

    bits.write_bytes(good[:-3])
    with pytest.raises(ConfigError, match=rf"documents bitmap {bits}: not a plain .npy array"):
        read_documents_read(where)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bits.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match=rf"{bits}: .*pickled Python objects, refused"):
        read_documents_read(where)
    with open(bits, "wb") as f:
        np.save(f, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=rf"{bits}: .*pickled Python objects, refused"):
        read_documents_read(where)
    assert not marker.exists()

    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    bits.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match=rf"{bits}: holds \d+ documents, .* says {entry['read']}: corrupt"):
        read_documents_read(where)

    bits.write_bytes(good)
    (where / dr.RECORD_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match=r"documents.json: not a readable documents-read record"):
        read_documents_read(where)
    with pytest.raises(ConfigError, match=r"no documents-read record"):
        read_documents_read(tmp_path / "nowhere")


def test_record_and_previous_stages_are_alternatives(blends, tmp_path):
    where = tmp_path / "stage1.documents"
    s1 = StageData(blends["s1"], SEQ1, GBS, cache_dir=str(tmp_path / "c"))
    record = write_documents_read(s1, USED1, where)
    _refused("excluded_documents and previous_stages: pass one", blends["s2"], SEQ2, GBS,
             cache_dir=str(tmp_path / "c"), excluded_documents=record, previous_stages=[(blends["s1"], USED1, SEQ1)])
    _refused("excluded_documents: expected a DocumentSet", blends["s2"], SEQ2, GBS,
             cache_dir=str(tmp_path / "c"), excluded_documents={"x": np.arange(3)})
    with pytest.raises(ConfigError, match=r"97 samples consumed, but the stage has only 96"):
        write_documents_read(s1, 97, tmp_path / "too_many")


def test_documents_read_in_chunks_equals_one_pass(blends, monkeypatch, tmp_path):
    """The chunked walk over consumed samples (bounded memory at any size) marks the same documents
    whatever the chunk size, on a blended stage (the dataset-index path) too."""
    cache = str(tmp_path / "c")
    s2 = StageData(blends["s2"], SEQ2, GBS, cache_dir=cache)
    want = reference_documents_read(s2.train_dataset, 37)
    for chunk in (1, 5, 64):
        monkeypatch.setattr(dr, "CHUNK", chunk)
        _same_sets(s2.documents_read(37), want)
