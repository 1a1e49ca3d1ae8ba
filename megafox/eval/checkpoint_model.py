"""A megafox checkpoint as model chunks ready to score, in this process's TP/PP layout.

Checkpoints store global tensors, so any saved layout loads at any evaluation layout. The chunks
are built as the training stack builds them (bf16 weights wrapped in megatron-core's
Float16Module, or fp32) and loaded as the trainer loads them (`megafox.checkpoint.load_model`,
which casts a checkpoint saved in another precision).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from megatron.core.transformer.module import Float16Module

from megafox.checkpoint.layout import read_metadata
from megafox.checkpoint.loader import load_model
from megafox.config import BuildConfig, ConfigError, ModelConfig, ParallelConfig
from megafox.formats.tokenizer import load_tokenizer
from megafox.model.build import build_model, uses_bf16


@dataclass
class CheckpointModel:
    chunks: List[torch.nn.Module]
    model: ModelConfig
    meta: Dict[str, Any]  # the checkpoint's record as a mapping (read_metadata)
    bf16: bool


def model_config(meta: Dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    data = {k: v for k, v in (meta.get("model") or {}).items() if k in known}
    try:
        return ModelConfig(**data).validate()
    except TypeError as exc:
        raise ConfigError(f"{meta.get('path')}: megafox.json has no usable model config ({exc})") from None


def recorded_tokenizer(meta: Dict[str, Any]) -> Optional[str]:
    """The tokenizer a training run recorded (trainer: {"path": ...}; megafox-from-hf: a path)."""
    recorded = meta.get("tokenizer")
    if isinstance(recorded, dict):
        recorded = recorded.get("path")
    return recorded if isinstance(recorded, str) and recorded else None


def load_tokenizer_for(meta: Dict[str, Any], override: Optional[str]):
    path = override or recorded_tokenizer(meta)
    if path is None:
        raise ConfigError(f"{meta.get('path')}: the checkpoint records no tokenizer; pass --tokenizer "
                          f"(the SentencePiece .model the model was trained with)")
    return load_tokenizer(path)


def load_checkpoint_model(root: Union[str, Path], iteration, parallel: ParallelConfig,
                          precision: str = "auto") -> CheckpointModel:
    """Every rank calls this after `init_distributed(parallel)`."""
    meta = read_metadata(root, iteration)
    model = model_config(meta)
    parallel.validate(model)
    build = BuildConfig(precision=precision)
    bf16 = uses_bf16(build)
    chunks = build_model(model, parallel, build)
    load_model(meta["path"], chunks)
    if bf16:
        chunks = [Float16Module(chunks[0].config, c) for c in chunks]
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    for chunk in chunks:
        chunk.eval()
    return CheckpointModel(chunks, model, meta, bf16)
