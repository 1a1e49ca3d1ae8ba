"""Bad data or arguments give a ConfigError (trainer exit 2) whose message names the file/field."""
import json
import os
import shutil

import pytest

from megafox.config import ConfigError
from megafox.data.stage_data import StageData
from tests.support.indexed import write_blend, write_indexed


def fails(match, *args, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        StageData(*args, **kwargs)
    return str(info.value)


@pytest.fixture
def good(corpus_data, tok_model, tmp_path):
    return write_blend(tmp_path / "ok" / "blend.json", tok_model, [(corpus_data["code"], 1.0)], 32 * 64)


def test_missing_or_malformed_blend(tmp_path, good):
    missing = str(tmp_path / "nowhere" / "blend.json")
    fails(f"{missing}: blend file not found", missing, 64, 8)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    fails(f"{bad}: not a readable JSON blend", str(bad), 64, 8)
    raw = json.load(open(good))
    for field in ("datasets", "tokenizer"):
        partial = tmp_path / f"no_{field}" / "blend.json"
        partial.parent.mkdir()
        partial.write_text(json.dumps({k: v for k, v in raw.items() if k != field}))
        fails(f"{partial}: missing field '{field}'", str(partial), 64, 8)
    no_budget = tmp_path / "ok" / "nobudget.json"
    no_budget.write_text(json.dumps({k: v for k, v in raw.items() if k != "token_budget"}))
    fails("missing field 'token_budget'", str(no_budget), 64, 8)
    assert StageData(str(no_budget), 64, 8, token_budget=16 * 64, cache_dir=str(tmp_path / "c")).num_samples == 16
    no_tok = tmp_path / "ok" / "notok.json"
    no_tok.write_text(json.dumps(dict(raw, tokenizer="missing.model")))
    fails(r"field 'tokenizer': .*missing.model does not exist", str(no_tok), 64, 8)


def test_missing_bin_idx_and_empty_dataset(corpus_data, tok_model, tmp_path):
    for ext, other in ((".bin", ".idx"), (".idx", ".bin")):
        prefix = str(tmp_path / f"only{other[1:]}")
        shutil.copy(corpus_data["code"] + other, prefix + other)
        blend = write_blend(tmp_path / f"b{ext[1:]}" / "blend.json", tok_model, [(prefix, 1.0)], 640)
        fails(rf"datasets\[0\]\.prefix: {prefix}\{ext} does not exist", blend, 64, 8)
    empty = str(tmp_path / "empty")
    write_indexed(empty, [])
    blend = write_blend(tmp_path / "be" / "blend.json", tok_model, [(corpus_data["code"], 1.0), (empty, 1.0)], 640)
    fails(rf"datasets\[1\]\.prefix: {empty} is an empty dataset", blend, 64, 8)
    garbage = str(tmp_path / "garbage")
    open(garbage + ".bin", "wb").write(b"x" * 100)
    open(garbage + ".idx", "wb").write(b"not an index at all")
    blend = write_blend(tmp_path / "bg" / "blend.json", tok_model, [(garbage, 1.0)], 640)
    fails(rf"{garbage}.idx is not a readable Megatron index \(bad header\)", blend, 64, 8)
    cut = str(tmp_path / "cut")
    shutil.copy(corpus_data["code"] + ".bin", cut + ".bin")
    open(cut + ".idx", "wb").write(open(corpus_data["code"] + ".idx", "rb").read()[:200])
    blend = write_blend(tmp_path / "bc" / "blend.json", tok_model, [(cut, 1.0)], 640)
    fails(rf"{cut}.idx is not a readable Megatron index \(truncated: 200 bytes\)", blend, 64, 8)


def test_blend_contents_checked(corpus_data, tok_model, tmp_path):
    code = corpus_data["code"]
    stale = write_blend(tmp_path / "s" / "blend.json", tok_model, [(code, 1.0)], 640)
    raw = json.load(open(stale))
    raw["datasets"][0]["documents"] = 7
    json.dump(raw, open(stale, "w"))
    fails(r"datasets\[0\]\.documents: the blend says 7 but .* holds 400", stale, 64, 8)
    dup = write_blend(tmp_path / "d" / "blend.json", tok_model, [(code, 1.0), (code, 2.0)], 640)
    fails(r"datasets\[1\]\.prefix: .* is already datasets\[0\]", dup, 64, 8)
    neg = write_blend(tmp_path / "n" / "blend.json", tok_model, [(code, -1.0)], 640)
    fails(r"datasets\[0\]\.weight: must be positive", neg, 64, 8)


def test_seq_length_beyond_the_data(corpus_data, tok_model, tmp_path, good):
    msg = fails("seq_length 100000 is larger than the data allows", good, 100000, 8, cache_dir=str(tmp_path / "c"))
    assert corpus_data["code"] in msg and "100001" in msg


def test_previous_stages_that_used_everything_or_too_much(corpus_data, tok_model, tmp_path):
    small = str(tmp_path / "small")
    docs = corpus_data["raw"][corpus_data["code"]][:12]
    write_indexed(small, docs)
    total = sum(map(len, docs))
    s1 = write_blend(tmp_path / "s1" / "blend.json", tok_model, [(small, 1.0)], total - 1)
    s2 = write_blend(tmp_path / "s2" / "blend.json", tok_model, [(small, 1.0)], 640)
    n1 = (total - 1 + 31) // 32
    fails(r"all training documents of .*small were read by earlier stages", s2, 32, 4,
          cache_dir=str(tmp_path / "c"), valid_fraction=0, previous_stages=[(s1, n1, 32)])
    fails(rf"{n1 + 1} samples consumed, but the stage has only {n1}", s2, 32, 4,
          cache_dir=str(tmp_path / "c"), valid_fraction=0, previous_stages=[(s1, n1 + 1, 32)])
    fails(r"previous_stages\[0\]\.seq_length: must be a positive integer", s2, 32, 4,
          previous_stages=[(s1, 1, 0)])
    fails(r"previous_stages\[0\]: unknown keys \['consumed'\]", s2, 32, 4,
          previous_stages=[{"blend": s1, "consumed": 1, "seq_length": 32}])


def test_batch_arguments(good, tmp_path):
    sd = StageData(good, 64, 8, cache_dir=str(tmp_path / "c"))
    assert sd.num_samples == 32
    list(sd.micro_batches(24, 4, 1, 2))  # the last global batch
    with pytest.raises(ConfigError, match=r"samples \[28, 36\) are past its end: .* gives 32 samples"):
        sd.micro_batches(28, 4, 0, 2)
    with pytest.raises(ConfigError, match="global_batch_size 8 is not divisible by micro_batch_size x dp_size = 3 x 1"):
        sd.micro_batches(0, 3, 0, 1)
    with pytest.raises(ConfigError, match="dp_rank: 2 is not below dp_size 2"):
        sd.micro_batches(0, 2, 2, 2)
    with pytest.raises(ConfigError, match="consumed_samples: must be an integer >= 0"):
        sd.micro_batches(-8, 2, 0, 2)
    fails("seq_length: must be a positive integer", good, 0, 8)
    fails(r"valid_fraction: must be in \[0, 1\)", good, 64, 8, valid_fraction=1.5)
    os.chmod(tmp_path, 0o500)
    try:
        if not os.access(tmp_path, os.W_OK):  # root ignores permissions
            fails("cache_dir .* not writable", good, 64, 8, cache_dir=str(tmp_path / "ro"))
    finally:
        os.chmod(tmp_path, 0o700)
