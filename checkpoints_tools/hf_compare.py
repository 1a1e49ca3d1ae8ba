"""`--verify` of megafox-to-hf and megafox-from-hf: the HF directory against the checkpoint as the
trainer loads it, two ways. (`megafox-ckpt verify`, a checkpoint's files against their digests,
is checkpoints_tools/verify.py.)

The megafox side is built at TP1/PP1 in this process and loaded through the trainer's own
`load_model` (megatron-core's dist_checkpointing, not the tools' reader), so the check covers the
checkpoint a training run would resume from.

1. Weights, exactly: converting is a permutation plus a dtype cast, so every HF tensor must equal
   the trainer-loaded weight cast to its dtype, bit for bit. A logit tolerance alone cannot do
   this job: one weight off by one standard deviation moves fox1-tiny's logits by ~2e-4, far
   below the 1e-3 that must also absorb fp32 summation-order noise at 1.6B scale.
2. Logits: transformers and megafox on the same ids, max |difference| <= tolerance. This catches
   what (1) cannot: a mapping both sides share but transformers reads differently (e.g. a
   swapped QKV grouping or norm).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from checkpoints_tools.common import init_single_process
from checkpoints_tools.streams import HFWeights
from megafox.config import BuildConfig, ModelConfig, ParallelConfig
from megafox.model.hf_adapter import (HF_EMBEDDING, HF_FINAL_NORM, HF_LM_HEAD, MCORE_EMBEDDING, MCORE_FINAL_NORM,
                                      MCORE_OUTPUT_LAYER, hf_plan, mcore_layer_name, megatron_layer_to_hf, uses_te_names)

DEFAULT_TOLERANCE = 1e-3


def verify_ids(model: ModelConfig, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, min(seq, model.max_position_embeddings)), generator=g)


def build_single(model: ModelConfig, padded_rows: Optional[int] = None):
    """A TP1/PP1 megafox model whose embedding has `padded_rows` rows (the checkpoint's padding)."""
    from megafox.model.build import build_model  # megatron-core: imported only by the commands that build a model

    init_single_process()
    if padded_rows is not None:
        # padded_vocab_size(1) == padded_rows for any multiple >= vocab_size; matches any saved TP.
        model = dataclasses.replace(model, make_vocab_size_divisible_by=padded_rows)
    # fp32 on any device: the check compares against transformers run in fp32
    return build_model(model, ParallelConfig(use_distributed_optimizer=False), BuildConfig(precision="fp32"))[0]


@torch.no_grad()
def megafox_logits(module: torch.nn.Module, model: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    module.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = module(ids, pos, None)
    return logits[..., : model.vocab_size].float()


def load_checkpoint_model(root: str, iteration, model: ModelConfig, padded_rows: int) -> torch.nn.Module:
    from megafox.checkpoint.loader import load_model  # megatron-core: imported only when --verify runs

    module = build_single(model, padded_rows)
    load_model(root, [module], iteration)
    return module


@torch.no_grad()
def round_weights(module: torch.nn.Module, round_to: Optional[torch.dtype]) -> None:
    """Compare the same weights: the HF copy was rounded to the export dtype."""
    if round_to is not None and round_to != torch.float32:
        for p in module.parameters():
            p.copy_(p.to(round_to).float())


@torch.no_grad()
def megafox_checkpoint_logits(root: str, iteration, model: ModelConfig, padded_rows: int, ids: torch.Tensor,
                              round_to: Optional[torch.dtype] = None) -> torch.Tensor:
    module = load_checkpoint_model(root, iteration, model, padded_rows)
    round_weights(module, round_to)
    out = megafox_logits(module, model, ids)
    del module
    return out


def hf_named_weights(module: torch.nn.Module, model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """A TP1/PP1 megafox model's weights under their HF names, one layer at a time (no copy of the model)."""
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state") and v is not None}
    te_names = uses_te_names(state)
    yield HF_EMBEDDING, state[MCORE_EMBEDDING][: model.vocab_size]
    for i in range(model.num_layers):
        prefix = mcore_layer_name(i, "")
        layer = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        yield from megatron_layer_to_hf([layer], i, model, te_names).items()
    yield HF_FINAL_NORM, state[MCORE_FINAL_NORM]
    if not model.tie_word_embeddings:
        yield HF_LM_HEAD, state[MCORE_OUTPUT_LAYER][: model.vocab_size]


@torch.no_grad()
def weight_mismatches(hf_dir: Path, module: torch.nn.Module, model: ModelConfig) -> List[str]:
    """Every tensor of HF_DIR against the loaded model's weight cast to the HF tensor's dtype:
    one line per tensor that is not bit-identical (NaN matching NaN), or is missing/extra."""
    weights = HFWeights(Path(hf_dir))
    expected = {name for name, _ in hf_plan(model)}
    problems = [f"{name}: not in the checkpoint's model" for name in sorted(set(weights.where) - expected)]
    for name, ours in hf_named_weights(module, model):
        if name not in weights.where:
            problems.append(f"{name}: missing")
            continue
        theirs = weights.get(name)
        if tuple(theirs.shape) != tuple(ours.shape):
            problems.append(f"{name}: shape {list(theirs.shape)}, checkpoint {list(ours.shape)}")
            continue
        ours = ours.to(theirs.dtype)
        differ = (ours != theirs) & ~(ours.isnan() & theirs.isnan())
        count = int(differ.sum())
        if count:
            worst = (ours[differ].float() - theirs[differ].float()).abs().nan_to_num(float("inf")).max().item()
            problems.append(f"{name}: {count} element(s) differ, max |diff| {worst:.3e}")
    return problems


@torch.no_grad()
def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    out = hf(input_ids=ids).logits.float()
    del hf
    return out


def report_logits(diff: float, tolerance: float) -> bool:
    ok = diff <= tolerance
    print(f"verify: max |logit(transformers) - logit(megafox)| = {diff:.3e} "
          f"(tolerance {tolerance:.1e}): {'OK' if ok else 'FAILED'}", flush=True)
    return ok


def check_logits(theirs, ours, tolerance=None) -> bool:
    """Print the max |logit difference| of two [batch, seq, vocab] tensors; True when within tolerance."""
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    return report_logits((theirs - ours).abs().max().item(), tol)


def report_weights(problems: List[str], total: int) -> bool:
    if not problems:
        print(f"verify: weights: all {total} tensors equal the checkpoint's, bit for bit: OK", flush=True)
        return True
    print(f"verify: weights: {len(problems)} of {total} tensors differ from the checkpoint: FAILED", flush=True)
    for line in problems[:10]:
        print(f"verify:   {line}", flush=True)
    return False


@torch.no_grad()
def hf_matches_checkpoint(hf_dir: Path, root: str, iteration, model: ModelConfig, padded_rows: int,
                          tolerance=None, round_to: Optional[torch.dtype] = None) -> bool:
    """`--verify` of both tools: HF_DIR's tensors equal the checkpoint's exactly, and transformers
    on HF_DIR gives megafox's logits on the same ids."""
    ids = verify_ids(model)
    theirs = hf_logits(hf_dir, ids)
    module = load_checkpoint_model(root, iteration, model, padded_rows)
    weights_ok = report_weights(weight_mismatches(hf_dir, module, model), len(hf_plan(model)))
    round_weights(module, round_to)
    logits_ok = check_logits(theirs, megafox_logits(module, model, ids), tolerance)
    del module
    return weights_ok and logits_ok
