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
  the unfused path (3 per chunk), at the cost of holding a weight-sized gradient between forward
  and backward. The rescale checks (asynchronously on GPU) that the incoming gradient really is
  c * weights; anything else fails loudly instead of giving wrong gradients.
* no weights: the forward keeps only each token's log-sum-exp, and the backward recomputes each
  chunk's logits (4 matmuls per chunk). Exact for any incoming gradient.

The returned per-token losses are fp32, as megatron-core's cross-entropy returns them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

# Cap on one chunk's fp32 logits (its bf16 logits/gradient come on top, ~1.5x in all). For Fox-1
# that is 1024 tokens at V_local = 256K (TP1), 2048 at TP2: GEMMs still large enough to run at
# full speed, and ~1.5 GB of loss working memory at any sequence length (plus the weight-sized
# gradient: 1 GB in bf16, which the precompute variant holds from forward to backward).
LOGITS_BUDGET_BYTES = 1 << 30


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
                               group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token loss of logits = hidden @ weight.T against labels, vocab-parallel over `group`.

    hidden [N, H] (already gathered/copied into the TP region, see FoxGPTModel), weight
    [V_local, H] (this rank's vocab shard), labels [N] (global vocab ids), token_weights [N] or
    None. Returns [N] fp32 losses; hidden and weight receive gradients.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, H] and [V_local, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels.shape)} must be [N={hidden.shape[0]}]")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    chunk = chunk_size(chunk_tokens, weight.shape[0])
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).to(torch.float32)
        # decided here: inside Function.forward grad mode is always off
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return _PrecomputedGrad.apply(hidden, weight, labels, token_weights, chunk, group, need_grad)
    return _RecomputedGrad.apply(hidden, weight, labels, chunk, group)


def _vocab_start(weight: torch.Tensor, group) -> int:
    return 0 if group is None else dist.get_rank(group) * weight.shape[0]


def _target_index(labels: torch.Tensor, vocab_start: int, vocab_local: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's column of each label, clamped, and a 0/1 float of whether this rank owns it."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1).unsqueeze(1), owned.to(torch.float32)


def _chunk_softmax(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_start: int, group):
    """Logits of one chunk -> (fp32 softmax over the global vocab [n, V_local], loss [n], lse [n],
    target column, owned). The softmax is computed in place in one fp32 buffer."""
    logits = h @ weight.t()
    idx, owned = _target_index(labels, vocab_start, weight.shape[0])
    target = logits.gather(1, idx).squeeze(1).float() * owned
    row_max = logits.amax(dim=1).float()
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    probs = logits.float()  # the same tensor when logits are fp32: fine, logits are not reused
    del logits
    probs.sub_(row_max.unsqueeze(1)).exp_()
    stats = torch.stack([probs.sum(dim=1), target])
    if group is not None:
        dist.all_reduce(stats, group=group)  # target is zero on every rank but its owner
    sum_exp, target = stats[0], stats[1]
    lse = row_max + sum_exp.log()
    probs.mul_(sum_exp.reciprocal().unsqueeze(1))
    return probs, lse - target, lse, idx, owned


def _grad_logits(probs: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, scale: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """d(sum scale_i * loss_i)/d logits = scale * (softmax - onehot(label)), in the GEMM dtype."""
    probs.scatter_add_(1, idx, -owned.unsqueeze(1))  # scatter, not boolean indexing: no host sync
    probs.mul_(scale.unsqueeze(1))
    return probs.to(dtype)


class _RecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, group):
        vocab_start = _vocab_start(weight, group)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            probs, losses[sl], lse[sl], _, _ = _chunk_softmax(hidden[sl], weight, labels[sl], vocab_start, group)
            del probs
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.vocab_start = chunk, vocab_start
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_losses = grad_losses.float()
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl]
            probs = (h @ weight.t()).float()
            probs.sub_(lse[sl].unsqueeze(1)).exp_()  # the saved global lse: no communication
            idx, owned = _target_index(labels[sl], ctx.vocab_start, weight.shape[0])
            grad = _grad_logits(probs, idx, owned, grad_losses[sl], hidden.dtype)
            del probs
            if grad_hidden is not None:
                torch.matmul(grad, weight, out=grad_hidden[sl])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
        return grad_hidden, grad_weight, None, None, None


class _PrecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk, group, need_grad):
        vocab_start = _vocab_start(weight, group)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if need_grad and weight.requires_grad else None
        ones = torch.ones(min(chunk, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            probs, losses[sl], _, idx, owned = _chunk_softmax(h, weight, labels[sl], vocab_start, group)
            if need_grad:
                # per-token d loss_i / d logits: hidden's gradient stays exact for any incoming
                # gradient; the weight's is the token_weights-weighted sum, rescaled in backward
                grad = _grad_logits(probs, idx, owned, ones[:h.shape[0]], hidden.dtype)
                if grad_hidden is not None:
                    torch.matmul(grad, weight, out=grad_hidden[sl])
                if grad_weight is not None:
                    weighted = h * token_weights[sl].to(h.dtype).unsqueeze(1)
                    grad_weight.addmm_(grad.t(), weighted)
                del grad
            del probs
        ctx.save_for_backward(token_weights, grad_hidden, grad_weight)
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
        if grad_weight is not None and ctx.needs_input_grad[1]:
            out_weight = grad_weight.mul_(c.to(grad_weight.dtype))
        return out_hidden, out_weight, None, None, None, None, None
