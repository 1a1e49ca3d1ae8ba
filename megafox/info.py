"""Sizing a job: exact parameter count, training FLOPs per token, per-GPU memory estimate.

The parameter count is exact (it is what megatron-core and HF build; tests check both). FLOPs
follow the usual 6N + attention convention. Memory is an estimate for planning, in the
Korthikanti et al. ("Reducing Activation Recomputation", 2022) style, for bf16 training with
fp32 main weights/grads and Adam, as megafox trains on GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

from megafox.config import ModelConfig
from megafox.model.hf_adapter import HF_EMBEDDING, HF_FINAL_NORM, HF_LM_HEAD, hf_layer_shapes, hf_plan

GIB = 1024 ** 3


def parameter_breakdown(model: ModelConfig) -> Dict[str, int]:
    """Parameters of the unpadded model, as HF counts them (tied weights once): the sizes of the
    tensors the HF adapter says a checkpoint of this model holds."""
    size = {name: math.prod(shape) for name, shape in hf_plan(model)}
    per_layer = sum(math.prod(shape) for shape in hf_layer_shapes(model).values())
    embedding, final_norm, head = size[HF_EMBEDDING], size[HF_FINAL_NORM], size.get(HF_LM_HEAD, 0)
    return {"embedding": embedding, "per_layer": per_layer, "layers": per_layer * model.num_layers,
            "final_norm": final_norm, "lm_head": head,
            "total": sum(size.values())}


def parameter_count(model: ModelConfig) -> int:
    return parameter_breakdown(model)["total"]


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x params (the LM head matmul included) + causal-agnostic
    attention scores and values, 12 x layers x seq x (heads x head_dim)."""
    attn_width = model.num_attention_heads * model.head_dim
    return 6.0 * parameter_count(model) + 12.0 * model.num_layers * seq_length * attn_width


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


def memory_per_gpu(model: ModelConfig, seq_length: int, tp: int = 1, pp: int = 1, dp: int = 1,
                   micro_batch_size: int = 1, distributed_optimizer: bool = True,
                   recompute: str = "none", fused_loss: bool = True) -> MemoryEstimate:
    """Bytes on the busiest GPU (the first pipeline stage, which also holds the embedding)."""
    n = parameter_breakdown(model)
    layers_here = model.num_layers // pp
    params_here = (n["layers"] // model.num_layers * layers_here) / tp + n["embedding"] / tp
    if pp > 1 and model.tie_word_embeddings:
        params_here += 0  # the last stage's copy of the tied head lives on another GPU
    weights = 2.0 * params_here  # bf16 model weights
    grads = 4.0 * params_here  # fp32 main grads (grad_reduce_in_fp32)
    optimizer = 12.0 * params_here / (dp if distributed_optimizer else 1)  # fp32 main weights + Adam m, v
    s, b, h = seq_length, micro_batch_size, model.hidden_size
    if recompute == "full":
        per_layer = 2.0 * s * b * h / tp  # only each layer's input is kept
    else:
        # flash/SDPA attention: no s x s scores are kept; 34 sbh bytes with sequence parallel / tp
        per_layer = 34.0 * s * b * h / tp
        if recompute == "selective":
            per_layer = 30.0 * s * b * h / tp
    in_flight = pp  # 1F1B keeps up to pp micro-batches of activations on the first stage
    activations = per_layer * layers_here * in_flight
    vocab_here = model.padded_vocab_size(tp) / tp
    if pp > 1:
        logits = 0.0  # the last stage holds them; the first stage is the busiest one counted
    elif fused_loss:
        # here: fused_loss imports torch, which `megafox info` otherwise never loads
        from megafox.model.fused_loss import DEFAULT_CHUNK_TOKENS, chunk_size

        # one chunk at a time (the trainer's default chunk, capped by the logits budget): its fp32
        # softmax and its bf16 gradient
        logits = (4.0 + 2.0) * min(s * b, chunk_size(DEFAULT_CHUNK_TOKENS, int(vocab_here))) * vocab_here
    else:
        logits = 2 * 4.0 * s * b * vocab_here  # fp32 logits + their gradient
    return MemoryEstimate(weights, grads, optimizer, activations, logits)


def format_report(model: ModelConfig, seq_length: int, tp: int, pp: int, dp: int,
                  micro_batch_size: int = 1, recompute: str = "none", fused_loss: bool = True) -> str:
    n = parameter_breakdown(model)
    mem = memory_per_gpu(model, seq_length, tp, pp, dp, micro_batch_size, recompute=recompute,
                         fused_loss=fused_loss)
    fpt = flops_per_token(model, seq_length)
    lines = [
        f"model: {model.name}  ({model.num_layers} layers, hidden {model.hidden_size}, ffn {model.ffn_hidden_size}, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} KV heads, vocab {model.vocab_size})",
        f"parameters: {n['total']:,}",
        f"  embedding: {n['embedding']:,}  per layer: {n['per_layer']:,}  lm head: "
        + ("tied" if model.tie_word_embeddings else f"{n['lm_head']:,}"),
        f"training FLOPs per token at seq {seq_length}: {fpt / 1e9:.2f} GFLOP",
        f"  tokens/s/GPU at 50% MFU of 989 TFLOP/s (H100 bf16): {0.5 * 989e12 / fpt:,.0f}",
        f"memory per GPU (estimate; tp={tp} pp={pp} dp={dp}, micro-batch {micro_batch_size}, bf16 + fp32 Adam, "
        f"distributed optimizer, recompute={recompute}, fused loss={'on' if fused_loss else 'off'}):",
        f"  weights     {mem.weights / GIB:8.2f} GiB",
        f"  grads       {mem.grads / GIB:8.2f} GiB",
        f"  optimizer   {mem.optimizer / GIB:8.2f} GiB",
        f"  activations {mem.activations / GIB:8.2f} GiB",
        f"  logits      {mem.logits / GIB:8.2f} GiB",
        f"  total       {mem.total / GIB:8.2f} GiB",
    ]
    return "\n".join(lines)
