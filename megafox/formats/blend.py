"""A curriculum stage's `blend.json`: one typed record for pretraining and SFT stages.

data_prep's plan writes it (`BlendRecord.write`), the trainer reads it (`BlendRecord.read`, then
megafox/data/blend.py opens the datasets it names); no other code parses the file.

    {"stage": "stage1", "tokenizer": "../tokenizer/tokenizer.model",
     "datasets": [{"prefix": "web", "weight": 0.7, "documents": N, "tokens": N,
                   "removed": {...}}, ...],                   # removed: what dedup left out
     "token_budget": N,
     "dedup": {"dedup": {...}, "decontaminate": {...}, "report": "dedup_report.json"}}

An SFT stage adds, per dataset, "mask_prefix" (its uint8 loss masks, megafox/formats/indexed.py) and
"trained_tokens", and at the top "kind": "sft", "seq_length" (no conversation is longer),
"chat_template" (the template's text: the trainer records it in its checkpoints and megafox-to-hf
writes it into tokenizer_config.json), "chat_template_name" and "chat_template_sha256".

Paths are relative to the blend.json's directory (or absolute).  Keys absent from a record are
absent from the file (files written before a key existed keep loading); keys a reader does not
know are ignored.  Reading checks every field's type and gives one error naming the file and field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megafox.formats import FormatError
from megafox.runtime.fs import atomic_write_json


class BlendError(FormatError):
    """A blend.json that cannot be read as one; the message names the file and field."""


@dataclass
class BlendDataset:
    prefix: str  # PREFIX.bin / PREFIX.idx
    weight: float
    documents: Optional[int] = None  # checked against the .idx by the reader when present
    tokens: Optional[int] = None
    removed: Optional[Dict[str, int]] = None  # per reason, what the stage's dedup left out
    mask_prefix: Optional[str] = None  # SFT: MASK_PREFIX.bin / .idx (default PREFIX.mask, beside PREFIX)
    trained_tokens: Optional[int] = None  # SFT: tokens with mask 1, as data_prep counted them


@dataclass
class BlendRecord:
    stage: str
    tokenizer: str
    datasets: List[BlendDataset]
    token_budget: Optional[int] = None
    dedup: Optional[Dict[str, Any]] = None
    kind: Optional[str] = None  # "sft"; absent for pretraining (what files before SFT hold)
    seq_length: Optional[int] = None
    chat_template: Optional[str] = None
    chat_template_name: Optional[str] = None
    chat_template_sha256: Optional[str] = None
    path: Optional[str] = field(default=None, compare=False)  # the file read (absolute), never written

    # ---------------------------------------------------------------------------- writing
    def to_json(self) -> Dict[str, Any]:
        """The file's object: fields in declaration order, absent (None) ones left out."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "datasets":
                value = [{k: v for k, v in dataclasses.asdict(d).items() if v is not None} for d in value]
            if f.name != "path" and value is not None:
                out[f.name] = value
        return out

    def write(self, path: str) -> str:
        atomic_write_json(path, self.to_json())
        return path

    # ---------------------------------------------------------------------------- reading
    @classmethod
    def read(cls, path: str) -> "BlendRecord":
        path = os.path.abspath(os.path.expanduser(str(path)))
        try:
            with open(path, "r", encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise BlendError(f"{path}: blend file not found") from None
        except (OSError, ValueError) as exc:
            raise BlendError(f"{path}: not a readable JSON blend ({exc})") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw: Any, path: str) -> "BlendRecord":
        """The record of `raw` (the parsed file at `path`); a missing stage is the directory's name."""
        if not isinstance(raw, dict):
            raise BlendError(f"{path}: expected a JSON object")
        for key in ("tokenizer", "datasets"):
            if key not in raw:
                raise BlendError(f"{path}: missing field '{key}'")
        if not isinstance(raw["tokenizer"], str) or not raw["tokenizer"]:
            raise BlendError(f"{path}: field 'tokenizer' must be a path")
        items = raw["datasets"]
        if not isinstance(items, list) or not items:
            raise BlendError(f"{path}: field 'datasets' must be a non-empty list")
        datasets = [_dataset(d, f"{path}: datasets[{i}]") for i, d in enumerate(items)]
        budget = raw.get("token_budget")
        if budget is not None:
            budget = _number(budget, f"{path}: field 'token_budget'", integer=True)
            if budget <= 0:
                raise BlendError(f"{path}: field 'token_budget' must be positive, got {budget}")
        seq_length = raw.get("seq_length")
        if seq_length is not None:
            seq_length = _number(seq_length, f"{path}: field 'seq_length'", integer=True)
        for key in ("kind", "chat_template", "chat_template_name", "chat_template_sha256"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise BlendError(f"{path}: field '{key}' must be a string, got {raw[key]!r}")
        if raw.get("dedup") is not None and not isinstance(raw["dedup"], dict):
            raise BlendError(f"{path}: field 'dedup' must be an object, got {raw['dedup']!r}")
        return cls(stage=str(raw.get("stage", os.path.basename(os.path.dirname(path)))), tokenizer=raw["tokenizer"],
                   datasets=datasets, token_budget=budget, dedup=raw.get("dedup"), kind=raw.get("kind"),
                   seq_length=seq_length, chat_template=raw.get("chat_template"),
                   chat_template_name=raw.get("chat_template_name"),
                   chat_template_sha256=raw.get("chat_template_sha256"), path=path)

    def resolve(self, relative: str) -> str:
        """A path the record names, as an absolute real path (relative ones are to the file's directory)."""
        p = os.path.expanduser(relative)
        return os.path.realpath(p if os.path.isabs(p) else os.path.join(os.path.dirname(self.path or ""), p))


def _number(value, where: str, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise BlendError(f"{where}: must be a{'n integer' if integer else ' number'}, got {value!r}")
    return int(value) if integer else value  # a weight keeps its JSON type: a file read and written is unchanged


def _dataset(d: Any, where: str) -> BlendDataset:
    if not isinstance(d, dict) or "prefix" not in d or "weight" not in d:
        raise BlendError(f"{where}: needs 'prefix' and 'weight'")
    weight = _number(d["weight"], f"{where}.weight")
    if not weight > 0:
        raise BlendError(f"{where}.weight: must be positive, got {float(weight)}")
    counts = {k: _number(d[k], f"{where}.{k}", integer=True) if d.get(k) is not None else None
              for k in ("documents", "tokens")}
    mask = d.get("mask_prefix")
    if mask is not None and (not isinstance(mask, str) or not mask):
        raise BlendError(f"{where}.mask_prefix: must be a path, got {mask!r}")
    removed = d.get("removed")
    if removed is not None and not isinstance(removed, dict):
        raise BlendError(f"{where}.removed: must be an object, got {removed!r}")
    trained = d.get("trained_tokens")  # informational: a reader never fails on it
    return BlendDataset(str(d["prefix"]), weight, counts["documents"], counts["tokens"], removed, mask,
                        int(trained) if isinstance(trained, int) and not isinstance(trained, bool) else None)
