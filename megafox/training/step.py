"""One training step on the chunks `megafox.parallel.parallelize` wrapped: forward/backward through
megatron-core's pipeline schedule, the loss reduced over the global batch, one gradient norm
deciding skip and clip, the optimizer step. The training loop, the equivalence tests and the
benchmark all step through here, so the three measure the same code.

The loss is a per-token mean over the whole global batch (`calculate_per_token_loss`): summed
over micro-batches and data-parallel ranks, divided by the total count of loss tokens, so any
TP/PP/DP layout of the same global batch gives the same loss and the same gradients.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megafox.model.attention import packed_seq_params


@dataclass
class StepResult:
    loss: float  # per-token mean over the global batch
    grad_norm: float
    num_tokens: int  # loss tokens in the global batch
    skipped: bool  # True when the step was not applied (non-finite loss or grads)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed masked loss and token count; the schedule divides by the global token count."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model: torch.nn.Module):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    else:
        position_ids = position_ids.to(device, non_blocking=True)
    if "cu_seqlens" in batch:
        # Packed conversations (megafox.data.sft_data): megatron's THD format, the micro-batch's
        # rows as ONE sequence of b x s tokens whose segments (cu_seqlens) attention keeps apart
        # and RoPE restarts in. Pipeline stages then exchange [b x s, 1, hidden] (SFTData.pipeline_shape).
        packed = packed_seq_params(batch["cu_seqlens"], int(batch["max_seqlen"]), device)
        tokens, labels, position_ids = (t.reshape(1, -1) for t in (tokens, labels, position_ids))
        _check_packed_pipeline_input(model, tokens.shape[1])
        output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask.reshape(1, -1),
                       packed_seq_params=packed)
        return output, partial(loss_func, loss_mask)
    # loss_mask lets the fused LM-head loss compute its weight gradient during the forward
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def _check_packed_pipeline_input(model: torch.nn.Module, num_tokens: int) -> None:
    received = getattr(get_attr_wrapped_model(model, "decoder"), "input_tensor", None)
    if received is not None and tuple(received.shape[:2]) != (num_tokens, 1):
        raise ValueError(f"packed micro-batches cross pipeline stages as [{num_tokens}, 1, hidden], but this stage "
                         f"received {tuple(received.shape)}: call train_step with (seq_length, micro_batch_size) "
                         f"= SFTData.pipeline_shape(micro_batch_size)")


def train_step(chunks: List[DistributedDataParallel], optimizer, data_iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, skip_nonfinite: bool = True,
               forward_only: bool = False, timers=None) -> StepResult:
    """Forward/backward over `num_microbatches` micro-batches, then one optimizer step.

    `data_iterator` yields micro-batch dicts (tokens, labels, loss_mask[, position_ids]); with
    virtual pipeline stages pass one iterator per chunk. `timers` (megafox.training.timers):
    the forward/backward, the gradient reduction (megatron-core's finalize_model_grads, where the
    data-parallel all-reduce waits for the slowest rank) and the optimizer step as phases.
    """
    phase = timers.phase if timers is not None else (lambda name: contextlib.nullcontext())
    if not forward_only:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    config = chunks[0].config
    finalize = config.finalize_model_grads_func
    if timers is not None and finalize is not None:
        config.finalize_model_grads_func = timers.wrap("grad_reduce", finalize)
    try:
        # megatron-core's forward_only does not turn autograd off: without no_grad a validation pass
        # would keep every activation (and the fused loss would compute LM-head gradients)
        with torch.set_grad_enabled(not forward_only), phase("forward_backward"):
            losses = forward_backward(
                forward_step_func=forward_step,
                data_iterator=data_iterator,
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )
            loss, tokens = _global_loss(losses)
    finally:
        config.finalize_model_grads_func = finalize
    if forward_only:
        return StepResult(loss, float("nan"), tokens, skipped=True)
    if skip_nonfinite and not math.isfinite(loss):
        return StepResult(loss, float("nan"), tokens, skipped=True)
    with phase("optimizer"):
        ok, grad_norm = _update(optimizer, skip_nonfinite)
    return StepResult(loss, grad_norm, tokens, skipped=not ok)


def _update(optimizer, skip_nonfinite: bool):
    """megatron-core's optimizer.step(), with one gradient norm deciding both skip and clip.

    Without an fp16 grad scaler megatron-core's optimizer does not check for inf/NaN: a NaN norm
    makes clipping a no-op and the update writes NaN into the weights. The norm it computes for
    clipping is already reduced over every rank that holds part of the model (and over the
    data-parallel shards of the distributed optimizer), so every rank takes the same decision
    without another pass over the gradients or another collective.
    """
    if optimizer.prepare_grads():  # the fp16 grad scaler found inf/NaN (and backed off)
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if skip_nonfinite and not math.isfinite(grad_norm):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _global_loss(losses: List[Dict[str, torch.Tensor]]):
    """Sum (loss, tokens) over micro-batches and DP ranks; share it with every PP stage.
    Summed where the losses are (one host sync per step, not one per micro-batch)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reports = [item["lm loss"].detach().to(device, torch.float64) for item in losses or []]
    total = torch.stack(reports).sum(dim=0) if reports else torch.zeros(2, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # only the last stage computed a loss; the others hold zeros
        torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = total.tolist()
    return (loss_sum / tokens if tokens else float("nan")), int(tokens)
