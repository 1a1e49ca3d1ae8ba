"""A SentencePiece `.model` file: the one loader, its sha256 and its special ids.

- `load_sentencepiece(path)`: the `SentencePieceProcessor` (data_prep tokenizes with it directly).
- `load_tokenizer(path)`: a `SentencePieceTokenizer`, the object megatron-core's datasets expect:
  `vocab_size`, `eod`/`eos_id`, `bos_id`, `pad_id`, `unk_id` read from the model file (ids that the
  model does not define are None), plus `encode`/`decode`.  GPTDatasetConfig reads `vocab_size`,
  `eod` and `pad`, and hashes `unique_identifiers` into its cache keys, so the model file's sha256 is
  part of them: a retrained tokenizer never reuses sample indices built for another one.
- `tokenizer_info(sp, path)`: what data_prep's manifests record of the tokenizer.

`path` may be the model file or a directory holding `tokenizer.model`; `~` and `$VARS` expand.  Every
error is a TokenizerError naming the path.  Special ids always come from the model file, never from
a convention.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional

import sentencepiece as spm

from megafox.formats import FormatError
from megafox.runtime.fs import sha256_file

SPECIAL_PIECES = ("unk", "bos", "eos", "pad")


class TokenizerError(FormatError):
    """The tokenizer file is missing or unusable; the message names the path."""


def resolve_tokenizer_path(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(os.path.expandvars(str(path))))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    return path


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    """The model file at `path` (see resolve_tokenizer_path), checked to be a SentencePiece model."""
    if not path:
        raise TokenizerError("no tokenizer given")
    given = os.path.abspath(os.path.expanduser(os.path.expandvars(str(path))))
    where = resolve_tokenizer_path(path)
    if where != given and not os.path.isfile(where):
        raise TokenizerError(f"tokenizer {given}: is a directory without tokenizer.model")
    if not os.path.isfile(where):
        raise TokenizerError(f"tokenizer {where}: no such file")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(where)
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError on a file that is not a model
        raise TokenizerError(f"tokenizer {where}: not a SentencePiece model ({str(exc).strip()[:200]})") from None
    if ok is False or sp.GetPieceSize() <= 0:
        raise TokenizerError(f"tokenizer {where}: not a SentencePiece model")
    return sp


def special_ids(sp: spm.SentencePieceProcessor) -> Dict[str, int]:
    """{"unk_id", "bos_id", "eos_id", "pad_id"} as the model defines them (-1: not defined)."""
    return {f"{name}_id": int(getattr(sp, f"{name}_id")()) for name in SPECIAL_PIECES}


def tokenizer_info(sp: spm.SentencePieceProcessor, path: str) -> dict:
    """What a data_prep manifest records of the tokenizer it used."""
    where = resolve_tokenizer_path(path)
    return {"path": where, "sha256": sha256_file(where), "vocab_size": int(sp.GetPieceSize()), **special_ids(sp)}


def _optional(i: int) -> Optional[int]:
    return None if i < 0 else int(i)  # SentencePiece reports an undefined special piece as -1


class SentencePieceTokenizer:
    def __init__(self, path: str, processor: spm.SentencePieceProcessor) -> None:
        self.path = path
        self.sp = processor
        self.sha256 = sha256_file(path)
        self.vocab_size = int(processor.GetPieceSize())
        ids = {k: _optional(v) for k, v in special_ids(processor).items()}
        self.eos_id, self.bos_id, self.pad_id, self.unk_id = ids["eos_id"], ids["bos_id"], ids["pad_id"], ids["unk_id"]
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
        # megatron masks labels equal to `pad`; its own sentinel is an id no data contains.  Imported
        # here: this module is data_prep's too, which must not load megatron-core to start.
        from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID

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
    """The model file at `path` as the tokenizer object megatron-core's datasets expect."""
    return SentencePieceTokenizer(resolve_tokenizer_path(path), load_sentencepiece(path))
