"""data_prep's door to the tokenizer contract (megafox/formats/tokenizer.py, the one loader): its
errors become DataPrepError, which every data_prep command prints as one line with exit status 2."""

from __future__ import annotations

from .common import DataPrepError
from megafox.formats.tokenizer import TokenizerError, load_sentencepiece


def load_tokenizer(path: str):
    """The SentencePieceProcessor of `path` (a .model file or a directory holding tokenizer.model)."""
    try:
        return load_sentencepiece(path)
    except TokenizerError as e:
        raise DataPrepError(str(e)) from None
