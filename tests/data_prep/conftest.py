"""Fixtures for data_prep tests: a real-text corpus (CPython stdlib sources, read from disk)
and a small SentencePiece BPE tokenizer trained once per session (vocab 2000, ~1 s)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for dp_helpers
from dp_helpers import stdlib_files  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s")


@pytest.fixture(scope="session")
def corpus():
    """List of real documents (stdlib .py sources), plus a few non-ASCII ones."""
    docs = []
    for p in stdlib_files():
        with open(p, encoding="utf-8") as f:
            t = f.read()
        if t.strip():
            docs.append(t)
    docs.append("Grüße aus Zürich — naïve café, 東京 2024年, emoji 🦊 and digits 1234567890.")
    docs.append("line one\n\n\tindented line two\r\nwindows line\u2028unicode separator")
    return docs


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from data_prep.train_tokenizer import train

    out = tmp_path_factory.mktemp("tok")
    files = stdlib_files(["email/*.py", "json/*.py"])
    return train(files, 2000, str(out), fmt="text", quiet=True)


@pytest.fixture(scope="session")
def sp(tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer)


