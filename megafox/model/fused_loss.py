"""LM head + cross-entropy over token chunks, never holding the full [tokens, vocab] logits.

Fox-1's 256K vocabulary makes one 8K-token micro-batch 2.1 G logits (8.4 GB in fp32, again for
their gradient). Here the logits of at most `chunk_tokens` tokens exist at a time; the vocab is
tensor-parallel (each TP rank holds rows [rank * V_local, (rank + 1) * V_local) of the output
weight, as megatron-core's ColumnParallelLinear does) and the softmax statistics are all-reduced
over the TP group, as in megatron-core's `vocab_parallel_cross_entropy`.

Two gradient strategies, same results:

* `token_weights` given (the loss is consumed as sum(weights * losses) * c, which is what
  megafox's loss_func does with the loss mask): the backward is computed inside the forward, chunk
  by chunk, while each chunk's logits exist anyway; backward only rescales. Same matmul count as
  the unfused path (3 per chunk); the weight gradient is summed during the forward (see below).
  The rescale checks (asynchronously on GPU) that the incoming gradient really is
  c * weights; anything else fails loudly instead of giving wrong gradients.
* no weights: the forward keeps only each token's log-sum-exp, and the backward recomputes each
  chunk's logits (4 matmuls per chunk). Exact for any incoming gradient.

Padded vocabulary: with `vocab_size` (the real vocabulary) smaller than the rows the weight holds
over the TP group, the padded rows' logits are -inf on whichever shard holds them, so the softmax
is over the real vocabulary only (the exported model's) and those rows receive zero gradient.

The returned per-token losses are fp32, as megatron-core's cross-entropy returns them. The
softmax/gradient arithmetic of a chunk is `megafox.model.loss_kernels` (eager or compiled).

The weight gradient is summed over chunks in fp32 whatever the weight's dtype (a bf16 running sum
is rounded once per chunk: ~3x the error of the unfused path's single GEMM at 128 chunks). When
the weight has megatron-core DDP's fp32 `main_grad` buffer, the sum goes straight into it, as
Transformer Engine's and apex's gradient-accumulation fusion do, and no weight-sized buffer is
allocated; autograd then receives a zero gradient for the weight, so the DDP hook still sees the
parameter as ready (and still adds a tied embedding's own gradient). Without `main_grad` the sum is
held in an fp32 buffer and rounded once, when returned. The precompute variant adds into
`main_grad` during the forward, so it requires c == 1 (megafox's loss_func with
`calculate_per_token_loss` and no loss scaling); anything else fails loudly in the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megafox.config import DEFAULT_LOSS_CHUNK_TOKENS
from megafox.model import loss_kernels

# Cap on one chunk's fp32 logits (the eager kernel's working copy; its bf16 logits/gradient come
# on top, ~1.5x in all; the compiled kernel holds only the bf16 ones). For Fox-1
# that is 1024 tokens at V_local = 256K (TP1), 2048 at TP2: GEMMs still large enough to run at
# full speed, and ~1.5 GB of loss working memory at any sequence length (plus the weight-sized
# fp32 gradient where there is no `main_grad` to add into: 2.1 GB at TP1, held from forward to
# backward by the precompute variant and during the backward by the recompute variant).
LOGITS_BUDGET_BYTES = 1 << 30
# Tokens per chunk asked for by default (the budget lowers it for large vocabularies).
DEFAULT_CHUNK_TOKENS = DEFAULT_LOSS_CHUNK_TOKENS  # the config owns the default
# Cap on the low-precision partial product added into the fp32 weight gradient at a time: 64K
# vocab rows of a 2048-wide weight in bf16, still one large GEMM per block.
WGRAD_BLOCK_BYTES = 1 << 28


def chunk_size(chunk_tokens: int, vocab_local: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk: `chunk_tokens`, lowered so one chunk's fp32 logits fit the budget."""
    if chunk_tokens < 1:
        raise ValueError(f"loss_chunk_tokens: must be >= 1, got {chunk_tokens}")
    by_budget = max(1, budget_bytes // (4 * vocab_local))
    if by_budget >= 64:
        by_budget -= by_budget % 64  # GEMM-friendly
    return max(1, min(chunk_tokens, by_budget))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               token_weights: Optional[torch.Tensor] = None, chunk_tokens: int = 1024,
                               group: Optional[dist.ProcessGroup] = None, kernel: str = "eager",
                               vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss of logits = hidden @ weight.T against labels, vocab-parallel over `group`.

    hidden [N, H] (already gathered/copied into the TP region, see FoxGPTModel), weight
    [V_local, H] (this rank's vocab shard), labels [N] (global vocab ids), token_weights [N] or
    None. `kernel`: eager | compiled (see megafox.model.loss_kernels). `vocab_size`: the real
    vocabulary; global rows >= it are padding, left out of the softmax (None: every row is real).
    Returns [N] fp32 losses; hidden and weight receive gradients.
    """
    if kernel not in loss_kernels.KERNELS:
        raise ValueError(f"loss_kernel: must be one of {', '.join(loss_kernels.KERNELS)}, got {kernel!r}")
    compiled = kernel == "compiled"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, H] and [V_local, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels.shape)} must be [N={hidden.shape[0]}]")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    chunk = chunk_size(chunk_tokens, weight.shape[0])
    valid = _valid_columns(weight, group, vocab_size)
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).to(torch.float32)
        # decided here: inside Function.forward grad mode is always off
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return _PrecomputedGrad.apply(hidden, weight, labels, token_weights, chunk, group, need_grad, compiled,
                                      valid)
    return _RecomputedGrad.apply(hidden, weight, labels, chunk, group, compiled, valid)


def _weight_grad_sum(weight: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """Where to sum the weight gradient: (fp32 tensor, whether it is megatron-core's main_grad)."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is not None and main_grad.dtype == torch.float32 and main_grad.shape == weight.shape:
        return main_grad, True
    return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device), False


def _zero_grad(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """For a gradient already added to main_grad: still marks the parameter ready for DDP's hook."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _accumulate_weight_grad(acc: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V_local, H] fp32 += grad.T @ h, for grad [n, V_local] and h [n, H] of any dtype."""
    if grad.dtype == acc.dtype:
        acc.addmm_(grad.t(), h)
        return
    # each block's product is rounded once to the GEMM dtype; the running sum stays fp32
    rows = max(1, WGRAD_BLOCK_BYTES // (h.shape[1] * grad.element_size()))
    for start in range(0, acc.shape[0], rows):
        block = slice(start, start + rows)
        acc[block] += grad[:, block].t() @ h


def _vocab_start(weight: torch.Tensor, group) -> int:
    return 0 if group is None else dist.get_rank(group) * weight.shape[0]


def _valid_columns(weight: torch.Tensor, group, vocab_size: Optional[int]) -> Optional[int]:
    """How many leading rows of this shard are real vocabulary; None when all are (no masking).
    Megatron pads the vocabulary at its end, so a shard's padded rows are always its last ones."""
    if vocab_size is None:
        return None
    valid = min(max(vocab_size - _vocab_start(weight, group), 0), weight.shape[0])
    return None if valid == weight.shape[0] else valid


def _target_index(labels: torch.Tensor, vocab_start: int, vocab_local: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's column of each label, clamped, and a 0/1 float of whether this rank owns it."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1).unsqueeze(1), owned.to(torch.float32)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                compiled: bool, valid: Optional[int]):
    """One chunk -> (source for loss_kernels.chunk_grad, loss [n], lse [n], target column, owned)."""
    idx, owned = _target_index(labels, vocab_start, weight.shape[0])
    source, loss, lse = loss_kernels.chunk_loss(h, weight, idx, owned, group, compiled, valid)
    return source, loss, lse, idx, owned


class _RecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, group, compiled, valid):
        vocab_start = _vocab_start(weight, group)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            source, losses[sl], lse[sl], _, _ = _chunk_loss(hidden[sl], weight, labels[sl], vocab_start, group, compiled,
                                                          valid)
            del source
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.vocab_start, ctx.compiled, ctx.valid = chunk, vocab_start, compiled, valid
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight, in_main_grad = _weight_grad_sum(weight) if ctx.needs_input_grad[1] else (None, False)
        grad_losses = grad_losses.float()
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl]
            source = loss_kernels.recomputed_source(h, weight, lse[sl], ctx.compiled, ctx.valid)
            idx, owned = _target_index(labels[sl], ctx.vocab_start, weight.shape[0])
            grad = loss_kernels.chunk_grad(source, lse[sl], idx, owned, grad_losses[sl], hidden.dtype, ctx.compiled)
            del source
            if grad_hidden is not None:
                torch.matmul(grad, weight, out=grad_hidden[sl])
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad, h)
        if grad_weight is not None:
            grad_weight = (_zero_grad(weight.shape, weight.dtype, weight.device) if in_main_grad
                           else grad_weight.to(weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


class _PrecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk, group, need_grad, compiled, valid):
        vocab_start = _vocab_start(weight, group)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad and hidden.requires_grad else None
        grad_weight, in_main_grad = _weight_grad_sum(weight) if need_grad and weight.requires_grad else (None, False)
        ones = torch.ones(min(chunk, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            source, losses[sl], lse, idx, owned = _chunk_loss(h, weight, labels[sl], vocab_start, group, compiled, valid)
            if need_grad:
                # per-token d loss_i / d logits: hidden's gradient stays exact for any incoming
                # gradient; the weight's is the token_weights-weighted sum, rescaled in backward
                grad = loss_kernels.chunk_grad(source, lse, idx, owned, ones[:h.shape[0]], hidden.dtype, compiled)
                if grad_hidden is not None:
                    torch.matmul(grad, weight, out=grad_hidden[sl])
                if grad_weight is not None:
                    weighted = h * token_weights[sl].to(h.dtype).unsqueeze(1)
                    _accumulate_weight_grad(grad_weight, grad, weighted)
                del grad
            del source
        ctx.save_for_backward(token_weights, grad_hidden, None if in_main_grad else grad_weight)
        ctx.weight_dtype, ctx.in_main_grad = weight.dtype, in_main_grad
        ctx.weight_shape, ctx.has_weight_grad = weight.shape, grad_weight is not None
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        token_weights, grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_losses.float()
        # the consumer computed c * sum(token_weights * losses): recover c without a host sync
        c = (g * token_weights).sum() / (token_weights * token_weights).sum().clamp_min(1e-30)
        mismatch = (g - c * token_weights).abs().max()
        torch._assert_async(mismatch <= 1e-4 * g.abs().max() + 1e-30,
                            "fused loss: the loss gradient is not proportional to the token weights "
                            "(loss_mask) passed to the model; call the model without loss_mask to "
                            "use the recomputing fused loss")
        out_hidden = None
        if grad_hidden is not None and ctx.needs_input_grad[0]:
            out_hidden = grad_hidden.mul_(g.to(grad_hidden.dtype).unsqueeze(1))
        out_weight = None
        if ctx.has_weight_grad and ctx.needs_input_grad[1]:
            if ctx.in_main_grad:
                # added to main_grad in the forward, unscaled: right only if c == 1
                unscaled = ((c - 1.0).abs() <= 1e-6) | (token_weights.abs().sum() == 0)  # nothing added
                torch._assert_async(unscaled,
                                    "fused loss: the LM-head weight gradient went into main_grad during the "
                                    "forward, which needs the loss to be exactly sum(loss_mask * losses) "
                                    "(megafox's loss_func, calculate_per_token_loss, no loss scaling); use "
                                    "loss_grad: recompute for any other loss")
                out_weight = _zero_grad(ctx.weight_shape, ctx.weight_dtype, g.device)
            else:
                out_weight = grad_weight.mul_(c).to(ctx.weight_dtype)
        return out_hidden, out_weight, None, None, None, None, None, None, None
