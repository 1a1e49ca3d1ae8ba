"""Loading any SentencePiece .model file, with clear errors."""

from __future__ import annotations

import os

from .common import DataPrepError
from megafox.runtime.fs import sha256_file


def load_tokenizer(path: str):
    """Return a SentencePieceProcessor for `path` or raise DataPrepError (never a traceback)."""
    import sentencepiece as spm

    if not path:
        raise DataPrepError("no tokenizer given (--tokenizer MODEL)")
    path = os.path.expanduser(os.path.expandvars(path))
    if os.path.isdir(path):
        cand = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(cand):
            raise DataPrepError(f"tokenizer {path}: is a directory without tokenizer.model")
        path = cand
    if not os.path.isfile(path):
        raise DataPrepError(f"tokenizer {path}: no such file")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError on garbage
        raise DataPrepError(f"tokenizer {path}: not a readable SentencePiece model ({str(e).strip()[:200]})") from None
    if ok is False or sp.GetPieceSize() <= 0:
        raise DataPrepError(f"tokenizer {path}: not a readable SentencePiece model")
    return sp


def resolve_tokenizer_path(path: str) -> str:
    path = os.path.expanduser(os.path.expandvars(path))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    return os.path.abspath(path)


def tokenizer_info(sp, path: str) -> dict:
    return {
        "path": resolve_tokenizer_path(path),
        "sha256": sha256_file(resolve_tokenizer_path(path)),
        "vocab_size": int(sp.GetPieceSize()),
        "unk_id": int(sp.unk_id()),
        "bos_id": int(sp.bos_id()),
        "eos_id": int(sp.eos_id()),
        "pad_id": int(sp.pad_id()),
    }
