"""`--verify`: run transformers and megafox on the same token ids, compare the logits.

The megafox side is built at TP1/PP1 in this process and loaded through the trainer's own
`load_model`, so the check covers the checkpoint a training run would resume from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from checkpoints_tools.common import init_single_process
from megafox.config import ModelConfig, ParallelConfig

DEFAULT_TOLERANCE = 1e-3


def verify_ids(model: ModelConfig, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, min(seq, model.max_position_embeddings)), generator=g)


def build_single(model: ModelConfig, padded_rows: Optional[int] = None):
    """A TP1/PP1 megafox model whose embedding has `padded_rows` rows (the checkpoint's padding)."""
    from megafox.model.build import BuildOptions, build_model

    init_single_process()
    if padded_rows is not None:
        # padded_vocab_size(1) == padded_rows for any multiple >= vocab_size; matches any saved TP.
        model = dataclasses.replace(model, make_vocab_size_divisible_by=padded_rows)
    return build_model(model, ParallelConfig(use_distributed_optimizer=False), BuildOptions())[0]


@torch.no_grad()
def megafox_logits(module: torch.nn.Module, model: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    module.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = module(ids, pos, None)
    return logits[..., : model.vocab_size].float()


@torch.no_grad()
def megafox_checkpoint_logits(root: str, iteration, model: ModelConfig, padded_rows: int, ids: torch.Tensor,
                              round_to: Optional[torch.dtype] = None) -> torch.Tensor:
    from megafox.checkpoint import load_model

    module = build_single(model, padded_rows)
    load_model(root, [module], iteration)
    if round_to is not None and round_to != torch.float32:
        # Compare the same weights: the HF copy was rounded to the export dtype.
        for p in module.parameters():
            p.copy_(p.to(round_to).float())
    out = megafox_logits(module, model, ids)
    del module
    return out


@torch.no_grad()
def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    out = hf(input_ids=ids).logits.float()
    del hf
    return out


def report(diff: float, tolerance: float) -> bool:
    ok = diff <= tolerance
    print(f"verify: max |logit(transformers) - logit(megafox)| = {diff:.3e} "
          f"(tolerance {tolerance:.1e}): {'OK' if ok else 'FAILED'}", flush=True)
    return ok


def check(theirs, ours, tolerance=None) -> bool:
    """Print the max |logit difference| of two [batch, seq, vocab] tensors; True when within tolerance."""
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    return report((theirs - ours).abs().max().item(), tol)


def hf_matches_checkpoint(hf_dir: Path, root: str, iteration, model: ModelConfig, padded_rows: int,
                          tolerance=None, round_to: Optional[torch.dtype] = None) -> bool:
    """`--verify` of both tools: transformers on HF_DIR vs megafox on the checkpoint, same ids."""
    ids = verify_ids(model)
    theirs = hf_logits(hf_dir, ids)
    ours = megafox_checkpoint_logits(root, iteration, model, padded_rows, ids, round_to=round_to)
    return check(theirs, ours, tolerance)
