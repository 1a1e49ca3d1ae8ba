"""megafox.formats: each on-disk contract against an independent reference (megatron-core's indexed
dataset reader and writer, blend.json text written by hand as docs/data.md documents it, the
SentencePiece model's own ids, hashlib, torch/numpy dtype names)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch

from megafox.formats import FormatError
from megafox.formats.blend import BlendError, BlendRecord
from megafox.formats.dtypes import dtype_name
from megafox.formats.indexed import (IndexFormatError, map_lengths, mask_prefix, read_header, read_idx,
                                     write_idx)
from megafox.formats.tokenizer import TokenizerError, load_sentencepiece, load_tokenizer, tokenizer_info
from tests.support.indexed import read_indexed, write_indexed
from tests.support.text import stdlib_texts
from tests.support.tokenizers import train_sentencepiece


# ------------------------------------------------------------------------------------ indexed
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_idx_is_megatron_cores(tmp_path, dtype):
    """The .idx we write equals the one megatron-core's builder writes for the same sequences; our
    checked reader reads megatron's files."""
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [7, 7]]
    ref = write_indexed(tmp_path / "ref", docs, dtype)
    write_idx(str(tmp_path / "ours.idx"), [len(d) for d in docs], dtype)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    header = read_header(ref + ".idx")
    assert (header.dtype, header.sequences, header.documents) == (dtype, 4, 5)
    _, megatron = read_indexed(ref)
    assert map_lengths(ref + ".idx", header).tolist() == list(megatron.sequence_lengths) == [3, 1, 5, 2]
    dt, lengths, doc_idx = read_idx(ref + ".idx")
    assert dt is dtype and lengths.tolist() == [3, 1, 5, 2] and doc_idx.tolist() == list(megatron.document_indices)
    assert mask_prefix(ref) == ref + ".mask"


def test_bad_idx_names_the_file_and_the_reason(tmp_path):
    good = write_indexed(tmp_path / "good", [[1, 2], [3]], np.uint16) + ".idx"
    raw = open(good, "rb").read()
    cases = {"magic.idx": b"XXXXXXXXX" + raw[9:], "version.idx": raw[:9] + (2).to_bytes(8, "little") + raw[17:],
             "code.idx": raw[:17] + bytes([99]) + raw[18:], "short.idx": raw[:20]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(IndexFormatError, match=f"{tmp_path / name} is not a readable Megatron index "
                                                   r"\(bad header\)"):
            read_header(str(tmp_path / name))
    (tmp_path / "cut.idx").write_bytes(raw[:-8])
    with pytest.raises(FormatError, match=rf"\(truncated: {len(raw) - 8} bytes\)"):
        read_idx(str(tmp_path / "cut.idx"))


# ------------------------------------------------------------------------------------ blend.json
# docs/data.md's blend.json, as a user or an older data_prep wrote it (hand-written text)
PRETRAIN = """{
  "stage": "stage1",
  "tokenizer": "../tokenizer/tokenizer.model",
  "datasets": [
    {
      "prefix": "web",
      "weight": 0.7,
      "documents": 3,
      "tokens": 30,
      "removed": {
        "exact_duplicate": 1
      }
    },
    {
      "prefix": "code",
      "weight": 4,
      "documents": 4,
      "tokens": 40
    }
  ],
  "token_budget": 1000,
  "dedup": {
    "dedup": {
      "exact": true
    },
    "decontaminate": null,
    "report": "dedup_report.json"
  }
}
"""
SFT = """{
  "stage": "sft",
  "tokenizer": "/abs/tokenizer.model",
  "datasets": [
    {
      "prefix": "chat",
      "weight": 5,
      "documents": 5,
      "tokens": 50,
      "mask_prefix": "chat.mask",
      "trained_tokens": 20
    }
  ],
  "token_budget": 77,
  "kind": "sft",
  "seq_length": 64,
  "chat_template": "{{ messages }}",
  "chat_template_name": "fox1",
  "chat_template_sha256": "abc"
}
"""


@pytest.mark.parametrize("text", [PRETRAIN, SFT], ids=["pretrain", "sft"])
def test_blend_record_reads_and_writes_the_documented_bytes(tmp_path, text):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blend.json").write_text(text)
    record = BlendRecord.read(str(tmp_path / "in" / "blend.json"))
    assert record.to_json() == json.loads(text)
    record.write(str(tmp_path / "out" / "blend.json"))
    assert (tmp_path / "out" / "blend.json").read_text() == text
    raw = json.loads(text)
    assert [d.prefix for d in record.datasets] == [d["prefix"] for d in raw["datasets"]]
    assert record.resolve(record.datasets[0].prefix) == os.path.realpath(tmp_path / "in" / raw["datasets"][0]["prefix"])
    assert record.resolve("/abs/x") == "/abs/x"
    assert (record.kind, record.seq_length) == (raw.get("kind"), raw.get("seq_length"))


def test_blend_minimal_file_defaults_stage_to_its_directory(tmp_path):
    (tmp_path / "stage7").mkdir()
    path = tmp_path / "stage7" / "blend.json"
    path.write_text('{"tokenizer": "t.model", "datasets": [{"prefix": "a", "weight": 1, "extra": 1}], "new": 2}')
    record = BlendRecord.read(str(path))
    assert record.stage == "stage7" and record.token_budget is None and record.datasets[0].documents is None
    assert record.to_json() == {"stage": "stage7", "tokenizer": "t.model", "datasets": [{"prefix": "a", "weight": 1}]}


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not a readable JSON blend"),
    ("[1]", r"expected a JSON object"),
    ('{"datasets": [{"prefix": "a", "weight": 1}]}', r"missing field 'tokenizer'"),
    ('{"tokenizer": 3, "datasets": [{"prefix": "a", "weight": 1}]}', r"field 'tokenizer' must be a path"),
    ('{"tokenizer": "t", "datasets": []}', r"field 'datasets' must be a non-empty list"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a"}]}', r"datasets\[0\]: needs 'prefix' and 'weight'"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": "x"}]}', r"datasets\[0\]\.weight: must be a number"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": 1}, {"prefix": "b", "weight": 0}]}',
     r"datasets\[1\]\.weight: must be positive"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": 1, "documents": 1.5}]}',
     r"datasets\[0\]\.documents: must be an integer"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": 1, "mask_prefix": ""}]}',
     r"datasets\[0\]\.mask_prefix: must be a path"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": 1}], "token_budget": -3}',
     r"field 'token_budget' must be positive"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": 1}], "seq_length": "long"}',
     r"field 'seq_length': must be an integer"),
    ('{"tokenizer": "t", "datasets": [{"prefix": "a", "weight": 1}], "chat_template": 5}',
     r"field 'chat_template' must be a string"),
])
def test_bad_blend_is_one_error_naming_file_and_field(tmp_path, content, message):
    path = tmp_path / "blend.json"
    path.write_text(content)
    with pytest.raises(BlendError, match=f"^{path}: .*{message}"):
        BlendRecord.read(str(path))
    with pytest.raises(BlendError, match="blend file not found"):
        BlendRecord.read(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def gemma_layout(tmp_path_factory):
    """Special ids in another order than Fox-1's (pad 0, eos 1, bos 2, unk 3): nothing may assume them."""
    return train_sentencepiece(tmp_path_factory.mktemp("tok"), stdlib_texts(["json/*.py"]), 400,
                               pad_id=0, eos_id=1, bos_id=2, unk_id=3)


def test_special_ids_and_hash_come_from_the_model_file(gemma_layout, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(gemma_layout))
    digest = hashlib.sha256(gemma_layout.read_bytes()).hexdigest()
    info = tokenizer_info(load_sentencepiece(str(gemma_layout)), str(gemma_layout))
    assert info == {"path": str(gemma_layout), "sha256": digest, "vocab_size": sp.vocab_size(),
                    "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id()}
    assert (info["pad_id"], info["eos_id"], info["bos_id"], info["unk_id"]) == (0, 1, 2, 3)
    tok = load_tokenizer(str(gemma_layout.parent))  # a directory holding tokenizer.model
    assert (tok.eod, tok.pad, tok.bos, tok.sha256, tok.path) == (1, 0, 2, digest, str(gemma_layout))


def test_tokenizer_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=f"tokenizer {tmp_path / 'empty'}: is a directory without tokenizer.model"):
        load_sentencepiece(str(tmp_path / "empty"))
    with pytest.raises(TokenizerError, match="no tokenizer given"):
        load_sentencepiece("")


# ------------------------------------------------------------------------------------ dtypes
def test_dtype_names_are_the_libraries_own():
    for t in (torch.bfloat16, torch.float16, torch.float32, torch.int32):
        assert "torch." + dtype_name(t) == str(t)
    for t in (np.uint8, np.uint16, np.int32, np.float32):
        assert dtype_name(t) == np.dtype(t).name == t.__name__
