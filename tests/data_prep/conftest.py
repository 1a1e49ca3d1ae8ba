"""Fixtures for data_prep tests: a real-text corpus (CPython stdlib sources, read from disk)
and a small SentencePiece BPE tokenizer trained once per session (vocab 2000, ~1 s)."""

import pytest

from tests.data_prep.dp_helpers import SLICE
from tests.support.text import stdlib_files, stdlib_texts


@pytest.fixture(scope="session")
def corpus():
    """List of real documents (stdlib .py sources), plus a few non-ASCII ones."""
    docs = [t for t in stdlib_texts(SLICE) if t.strip()]
    docs.append("Grüße aus Zürich — naïve café, 東京 2024年, emoji 🦊 and digits 1234567890.")
    docs.append("line one\n\n\tindented line two\r\nwindows line\u2028unicode separator")
    return docs


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """Trained by data_prep's own trainer (the one under test), as `make preprocess` trains it."""
    from data_prep.train_tokenizer import train

    out = tmp_path_factory.mktemp("tok")
    files = stdlib_files(["email/*.py", "json/*.py"])
    return train(files, 2000, str(out), fmt="text", quiet=True)


@pytest.fixture(scope="session")
def sp(tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer)
