"""Session fixtures for megafox.data tests: a SentencePiece BPE model (vocab 1000) trained on a
slice of the CPython standard library, and two tiny Megatron indexed datasets of its sources."""
from __future__ import annotations

import os

import pytest

from tests.support.indexed import write_blend, write_indexed
from tests.support.text import paragraphs, stdlib_texts
from tests.support.tokenizers import encode_documents, train_sentencepiece


@pytest.fixture(scope="session")
def tok_model(tmp_path_factory):
    return str(train_sentencepiece(tmp_path_factory.mktemp("tok"), stdlib_texts(["json/*.py", "email/*.py"]), 1000))


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory, tok_model):
    """`code`: 400 paragraphs of http/urllib/logging/xml.dom sources (<= 160 tokens each);
    `prose`: 300 paragraphs of json/email sources (<= 100 tokens each); each ends with eos."""
    root = tmp_path_factory.mktemp("data")
    code = encode_documents(tok_model, paragraphs(stdlib_texts(["http/*.py", "urllib/*.py", "logging/*.py",
                                                                "xml/dom/*.py"]), 400), max_tokens=159)
    prose = encode_documents(tok_model, paragraphs(stdlib_texts(["json/*.py", "email/*.py"]), 300), max_tokens=99)
    write_indexed(root / "code", code)
    write_indexed(root / "prose", prose)
    code_p, prose_p = os.path.realpath(root / "code"), os.path.realpath(root / "prose")
    return {"root": root, "code": code_p, "prose": prose_p, "raw": {code_p: code, prose_p: prose}}


@pytest.fixture(scope="session")
def blends(corpus_data, tok_model, tmp_path_factory):
    """A curriculum over the two datasets, stage i at sequence length 64 * 2^(i-1): s1 (96 samples of
    code), s2 (40 of code 0.6 + prose 0.4), s3 (24 of prose + code); and `mix`, one stage of 64
    samples of 64 tokens (code 0.7 + prose 0.3)."""
    root = tmp_path_factory.mktemp("blends")
    code, prose = corpus_data["code"], corpus_data["prose"]
    return {
        "s1": write_blend(root / "stage1" / "blend.json", tok_model, [(code, 1.0)], 96 * 64, "stage1"),
        "s2": write_blend(root / "stage2" / "blend.json", tok_model, [(code, 0.6), (prose, 0.4)], 40 * 128, "stage2"),
        "s3": write_blend(root / "stage3" / "blend.json", tok_model, [(prose, 0.5), (code, 0.5)], 24 * 256, "stage3"),
        "mix": write_blend(root / "mix" / "blend.json", tok_model, [(code, 0.7), (prose, 0.3)], 64 * 64, "mix"),
    }
