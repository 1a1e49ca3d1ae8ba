"""A SentencePiece `.model` file as the tokenizer object megatron-core's datasets expect.

`load_tokenizer(path)` -> `SentencePieceTokenizer` with `vocab_size`, `eod`/`eos_id`, `bos_id`,
`pad_id`, `unk_id` read from the model file (ids that the model does not define are None), plus
`encode`/`decode`.  GPTDatasetConfig reads `vocab_size`, `eod` and `pad`, and hashes
`unique_identifiers` into its cache keys, so the model file's sha256 is part of them: a retrained
tokenizer never reuses sample indices built for another one.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import List, Optional

from megafox.config import ConfigError


class TokenizerError(ConfigError):
    """The tokenizer file is missing or unusable; the message names the path."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _optional(i: int) -> Optional[int]:
    return None if i < 0 else int(i)  # SentencePiece reports an undefined special piece as -1


class SentencePieceTokenizer:
    def __init__(self, path: str, processor) -> None:
        self.path = path
        self.sp = processor
        self.sha256 = _sha256(path)
        self.vocab_size = int(processor.GetPieceSize())
        self.eos_id = _optional(processor.eos_id())
        self.bos_id = _optional(processor.bos_id())
        self.pad_id = _optional(processor.pad_id())
        self.unk_id = _optional(processor.unk_id())
        if self.eos_id is None:
            raise TokenizerError(f"tokenizer {path}: defines no end-of-sequence piece (eos_id), which "
                                 f"documents need as their separator")
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("sha256", self.sha256), ("vocab_size", self.vocab_size),
             ("eod", self.eos_id), ("pad", self.pad_id)])

    # megatron-core's names
    @property
    def eod(self) -> int:
        return self.eos_id

    @property
    def eos(self) -> int:
        return self.eos_id

    @property
    def pad(self) -> int:
        from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID

        # megatron masks labels equal to `pad`; its own sentinel is an id no data contains
        return _PAD_TOKEN_ID if self.pad_id is None else self.pad_id

    @property
    def bos(self) -> Optional[int]:
        return self.bos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = list(self.sp.EncodeAsIds(text))
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"tokenizer {self.path}: defines no bos piece")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    tokenize = encode

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    detokenize = decode

    def info(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    def __repr__(self) -> str:  # megatron logs its config, which holds this object
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> SentencePieceTokenizer:
    """Load a SentencePiece model file (or a directory holding tokenizer.model)."""
    import sentencepiece as spm

    if not path:
        raise TokenizerError("no tokenizer path given")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {path}: no such file")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError on a file that is not a model
        raise TokenizerError(f"tokenizer {path}: not a SentencePiece model ({str(exc).strip()[:200]})") from None
    if ok is False or sp.GetPieceSize() <= 0:
        raise TokenizerError(f"tokenizer {path}: not a SentencePiece model")
    return SentencePieceTokenizer(path, sp)
