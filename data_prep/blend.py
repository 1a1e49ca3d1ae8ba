"""blend.json: the contract between data preparation and the trainer.

One file per curriculum stage, written by `python -m data_prep.plan` at <output_dir>/<stage>/blend.json:

    {"stage": "stage1",
     "tokenizer": "../tokenizer/tokenizer.model",        # relative to the blend.json directory (or absolute)
     "datasets": [{"prefix": "web", "weight": 0.7, "documents": N, "tokens": N}, ...],
     "token_budget": N}

`load_blend(path)` returns the same dict with `tokenizer` and every `prefix` made absolute, after
checking that the tokenizer and every PREFIX.bin / PREFIX.idx exist.  Megatron's
`--data-path` form is `blend_to_megatron_args(blend)` -> [w1, prefix1, w2, prefix2, ...].
"""

from __future__ import annotations

import json
import os
from typing import List

from .common import DataPrepError


class BlendError(DataPrepError, ValueError):
    pass


def _resolve(base: str, p: str) -> str:
    p = os.path.expanduser(p)
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))


def load_blend(path: str) -> dict:
    """Read and validate a blend.json; prefixes and tokenizer come back as absolute paths."""
    path = os.path.abspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            blend = json.load(f)
    except FileNotFoundError:
        raise BlendError(f"{path}: blend file not found") from None
    except ValueError as e:
        raise BlendError(f"{path}: not valid JSON ({e})") from None
    base = os.path.dirname(path)
    if not isinstance(blend, dict):
        raise BlendError(f"{path}: expected a JSON object")
    for key in ("stage", "tokenizer", "datasets"):
        if key not in blend:
            raise BlendError(f"{path}: missing field '{key}'")
    if not isinstance(blend["tokenizer"], str) or not blend["tokenizer"]:
        raise BlendError(f"{path}: field 'tokenizer' must be a path")
    tok = _resolve(base, blend["tokenizer"])
    if not os.path.isfile(tok):
        raise BlendError(f"{path}: field 'tokenizer': {tok} does not exist")
    ds = blend["datasets"]
    if not isinstance(ds, list) or not ds:
        raise BlendError(f"{path}: field 'datasets' must be a non-empty list")
    out: List[dict] = []
    for i, d in enumerate(ds):
        where = f"{path}: datasets[{i}]"
        if not isinstance(d, dict) or "prefix" not in d or "weight" not in d:
            raise BlendError(f"{where}: needs 'prefix' and 'weight'")
        w = d["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise BlendError(f"{where}.weight: must be a positive number, got {w!r}")
        prefix = _resolve(base, str(d["prefix"]))
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise BlendError(f"{where}.prefix: {prefix}{ext} does not exist")
        out.append(dict(d, prefix=prefix))
    tb = blend.get("token_budget")
    if tb is not None and (isinstance(tb, bool) or not isinstance(tb, (int, float)) or tb < 0):
        raise BlendError(f"{path}: field 'token_budget' must be a non-negative number")
    return dict(blend, tokenizer=tok, datasets=out, path=path)


def blend_to_megatron_args(blend: dict) -> list:
    """[weight, prefix, weight, prefix, ...] as Megatron's --data-path / blend expects."""
    args: list = []
    for d in blend["datasets"]:
        args += [float(d["weight"]), d["prefix"]]
    return args
