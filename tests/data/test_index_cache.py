"""megatron's sample-index cache as megafox reads and writes it: a planted pickle or object array is
refused by name and never runs; a killed build leaves no file under a final name; every rank,
the builder included, memory-maps the cache; the blending index is cached in one process too."""
from __future__ import annotations

import glob
import os
import pickle

import numpy as np
import pytest
import torch

from megafox.config import ConfigError
from megafox.data import index_cache
from megafox.data.stage_data import StageData
from tests.data.data_helpers import gather
from tests.support.indexed import write_blend

SEQ, GBS = 64, 8


@pytest.fixture
def blend(corpus_data, tok_model, tmp_path):
    return write_blend(tmp_path / "b" / "blend.json", tok_model,
                       [(corpus_data["code"], 0.7), (corpus_data["prose"], 0.3)], 48 * SEQ, "mix")


class _Payload:
    """Unpickling this creates `marker`: a stand-in for code a planted cache file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "object_array"])
@pytest.mark.parametrize("which", ["shuffle_index", "dataset_index"])
def test_planted_cache_file_is_refused_and_never_runs(blend, tmp_path, kind, which):
    cache = str(tmp_path / "cache")
    StageData(blend, SEQ, GBS, cache_dir=cache)
    target = sorted(p for p in glob.glob(os.path.join(cache, f"*-{which}.npy")) if "-train-" in p)[0]
    marker = str(tmp_path / f"ran-{kind}-{which}")
    with open(target, "wb") as f:
        if kind == "pickle":
            f.write(pickle.dumps(_Payload(marker)))
        else:
            np.save(f, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    if kind == "pickle":
        # the threat is real: megatron-core's own reader (allow_pickle=True) runs it
        np.load(target, mmap_mode="r", allow_pickle=True)
        assert os.path.exists(marker)
        os.remove(marker)
    with pytest.raises(ConfigError) as info:
        StageData(blend, SEQ, GBS, cache_dir=cache)
    message = str(info.value)
    assert message.startswith(f"data cache {target}: not a plain .npy array (it holds pickled Python objects, refused")
    assert message.endswith("delete it to rebuild") and "\n" not in message
    assert not os.path.exists(marker)


def test_wrong_array_in_cache_is_refused(blend, tmp_path):
    cache = str(tmp_path / "cache")
    StageData(blend, SEQ, GBS, cache_dir=cache)
    target = sorted(p for p in glob.glob(os.path.join(cache, "*-sample_index.npy")) if "-train-" in p)[0]
    np.save(target, np.zeros(5, dtype=np.float32))
    with pytest.raises(ConfigError, match=rf"data cache {target}: not a megatron index array \(dtype float32, 1 "
                                          r"dimensions; expected 2-dimensional integers\)"):
        StageData(blend, SEQ, GBS, cache_dir=cache)


def test_builder_and_readers_memory_map_the_cache(blend, tmp_path):
    cache = str(tmp_path / "cache")
    built = StageData(blend, SEQ, GBS, cache_dir=cache)  # builds every index
    loaded = StageData(blend, SEQ, GBS, cache_dir=cache)  # finds them
    for sd in (built, loaded):
        train = sd.train_dataset
        # the blending index is cached and mapped in one process too (megatron's needs torch.distributed)
        assert isinstance(train.dataset_index, np.memmap) and isinstance(train.dataset_sample_index, np.memmap)
        for ds in train.datasets:
            for name in ("document_index", "sample_index", "shuffle_index"):
                assert isinstance(getattr(ds, name), np.memmap), name
                assert not getattr(ds, name).flags.writeable
    assert torch.equal(gather(built, 0, 48)["tokens"], gather(loaded, 0, 48)["tokens"])
    assert not [n for n in os.listdir(cache) if n.startswith(index_cache.SCRATCH_PREFIX)]


def test_killed_build_leaves_no_file_under_a_final_name(blend, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    real_save = np.save
    calls = []

    def dies_on_second_save(path, *args, **kwargs):
        calls.append(str(path))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-build")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(np, "save", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        StageData(blend, SEQ, GBS, cache_dir=cache)
    monkeypatch.undo()
    assert calls[0].startswith(os.path.join(cache, index_cache.SCRATCH_PREFIX))  # megatron wrote into scratch
    assert not [n for n in os.listdir(cache) if n.endswith(".npy") or n.endswith(".txt")]

    # a scratch directory left by a build killed harder (SIGKILL) goes with the next build
    os.makedirs(os.path.join(cache, index_cache.SCRATCH_PREFIX + "123-dead"))
    reference = gather(StageData(blend, SEQ, GBS, cache_dir=str(tmp_path / "fresh")), 0, 48)
    rebuilt = StageData(blend, SEQ, GBS, cache_dir=cache)
    assert torch.equal(gather(rebuilt, 0, 48)["tokens"], reference["tokens"])
    assert not [n for n in os.listdir(cache) if n.startswith(index_cache.SCRATCH_PREFIX)]


def test_cache_keys_are_unchanged():
    """The documents digest (part of every cache key) is the md5 of the whole int64 id arrays, as
    before it was computed in slices: caches of existing runs stay valid."""
    import hashlib

    from megafox.data.stage_data import _digest

    rng = np.random.default_rng(0)
    docs = {"/d/web": {"train": rng.integers(0, 1 << 30, (1 << 22) + 17).astype(np.int32),
                       "valid": np.arange(5, dtype=np.int32)},
            "/d/code": {"train": np.arange(3, dtype=np.int32), "valid": np.zeros(0, dtype=np.int32)}}
    h = hashlib.md5(usedforsecurity=False)
    for prefix in sorted(docs):
        for split in sorted(docs[prefix]):
            h.update(f"{prefix}\0{split}\0".encode())
            h.update(np.ascontiguousarray(docs[prefix][split], dtype=np.int64).tobytes())
    assert _digest(docs) == h.hexdigest()
