"""Session fixtures for megafox.data tests: a SentencePiece BPE model (vocab 1000) trained on a
slice of the CPython standard library, and two tiny Megatron indexed datasets of its sources."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from data_helpers import encode_docs, paragraphs, stdlib_texts, write_indexed  # noqa: E402


@pytest.fixture(scope="session")
def tok_model(tmp_path_factory):
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("tok")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(stdlib_texts(["json/*.py", "email/*.py"])), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, num_threads=2)
    return str(out / "tokenizer.model")


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory, tok_model):
    """`code`: 400 paragraphs of http/urllib/logging/xml.dom sources (<= 160 tokens each);
    `prose`: 300 paragraphs of json/email sources (<= 100 tokens each); each ends with eos."""
    root = tmp_path_factory.mktemp("data")
    code = encode_docs(tok_model, paragraphs(stdlib_texts(["http/*.py", "urllib/*.py", "logging/*.py",
                                                          "xml/dom/*.py"]), 400), 159)
    prose = encode_docs(tok_model, paragraphs(stdlib_texts(["json/*.py", "email/*.py"]), 300), 99)
    write_indexed(str(root / "code"), code)
    write_indexed(str(root / "prose"), prose)
    code_p, prose_p = os.path.realpath(root / "code"), os.path.realpath(root / "prose")
    return {"root": root, "code": code_p, "prose": prose_p, "raw": {code_p: code, prose_p: prose}}
