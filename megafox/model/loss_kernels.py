"""The element-wise part of the fused LM-head loss, per chunk of logits: softmax statistics, the
per-token loss and d loss / d logits, in two implementations with the same results.

eager     torch ops, in place in one fp32 [n, V_local] buffer per chunk: ~8 passes over it.
compiled  the same maths as three `torch.compile`d functions (Triton kernels on GPU), each one
          pass over the chunk's logits in their own dtype (bf16 on GPU): no fp32 copy of the
          chunk is held, and the gradient is written once. The first call of each compiles
          (seconds); shapes are dynamic, so the last, shorter chunk does not recompile.

Vocab-parallel: the statistics are all-reduced over the TP group between the passes, as in
megatron-core's `vocab_parallel_cross_entropy` (row max: MAX; sum of exp and target logit: SUM).

`valid` is how many leading columns of this shard are real vocabulary (the rest are the rows
Megatron pads the vocabulary with): the others are set to -inf as soon as the GEMM writes them, so
they take no part in the softmax and their gradient (softmax - onehot) is exactly zero. None when
the whole shard is real: nothing is touched.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megafox.config import LOSS_KERNELS as KERNELS  # noqa: F401  (the config validates against it)


def chunk_loss(h: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, group,
               compiled: bool, valid: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits h @ weight.T of one chunk -> (source for `chunk_grad`, loss [n] fp32, lse [n] fp32).
    The source is the fp32 softmax (eager) or the logits themselves (compiled). The GEMM is done
    here so that eager drops the low-precision logits as soon as their fp32 copy exists."""
    logits = _mask_padding(h @ weight.t(), valid)
    row_max, target = (_compiled()["row_stats"] if compiled else _row_stats)(logits, idx, owned)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    if compiled:
        source = logits
        stats = torch.stack([_compiled()["sum_exp"](logits, row_max), target])
    else:
        source = logits.float()  # the same tensor when logits are fp32: fine, they are not reused
        del logits
        source.sub_(row_max.unsqueeze(1)).exp_()
        stats = torch.stack([source.sum(dim=1), target])
    if group is not None:
        dist.all_reduce(stats, group=group)  # target is zero on every rank but its owner
    sum_exp, target = stats[0], stats[1]
    lse = row_max + sum_exp.log()
    if not compiled:
        source.mul_(sum_exp.reciprocal().unsqueeze(1))
    return source, lse - target, lse


def recomputed_source(h: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, compiled: bool,
                      valid: Optional[int] = None) -> torch.Tensor:
    """`chunk_grad`'s source from the chunk's logits recomputed and the saved global lse (no
    communication)."""
    logits = _mask_padding(h @ weight.t(), valid)
    if compiled:
        return logits
    source = logits.float()
    del logits
    return source.sub_(lse.unsqueeze(1)).exp_()


def chunk_grad(source: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor,
               scale: torch.Tensor, dtype: torch.dtype, compiled: bool) -> torch.Tensor:
    """d(sum scale_i * loss_i)/d logits = scale * (softmax - onehot(label)), in the GEMM dtype.
    Eager: `source` (the fp32 softmax) is overwritten."""
    if compiled:
        return _compiled()["grad"](source, lse, idx, owned, scale).to(dtype)
    source.scatter_add_(1, idx, -owned.unsqueeze(1))  # scatter, not boolean indexing: no host sync
    source.mul_(scale.unsqueeze(1))
    return source.to(dtype)


def _mask_padding(logits: torch.Tensor, valid: Optional[int]) -> torch.Tensor:
    """-inf in the padded columns, in place (a slice fill: no copy of the chunk)."""
    if valid is not None:
        logits[:, valid:] = float("-inf")
    return logits


def _row_stats(logits, idx, owned):
    # where, not * owned: a rank that does not own the label may read a padded (-inf) column
    target = torch.where(owned > 0, logits.gather(1, idx).squeeze(1).float(), 0.0)
    return logits.amax(dim=1).float(), target


def _sum_exp(logits, row_max):
    return torch.exp(logits.float() - row_max.unsqueeze(1)).sum(dim=1)


def _grad(logits, lse, idx, owned, scale):
    p = torch.exp(logits.float() - lse.unsqueeze(1))
    cols = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    p = p - (cols == idx).to(p.dtype) * owned.unsqueeze(1)
    return (p * scale.unsqueeze(1)).to(logits.dtype)


_COMPILED = {}


def _compiled() -> dict:
    if not _COMPILED:
        for fn in (_row_stats, _sum_exp, _grad):
            _COMPILED[fn.__name__.lstrip("_")] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED
