"""The built model chunks made ready to train on this rank's part of the TP x PP x DP layout.

torchtitan's `parallelize.py` is the anchor: `megafox.model` builds the architecture (megatron-core
already splits it over TP and pipeline stages at construction), and the data-parallel side is
applied here, from outside: Float16Module for bf16, the device, megatron-core's
DistributedDataParallel (contiguous grad buffers, bucketed all-reduce or reduce-scatter), the
pipeline schedule's grad-sync hooks, and the (distributed) optimizer sharded over those buffers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

# The optimizer settings are the training config's own section (AdamW hyper-parameters).
from megafox.config import BuildConfig, ParallelConfig
from megafox.config import OptimizerConfig as OptimizerSettings
from megafox.model.build import uses_bf16


def parallelize_model(chunks: List[torch.nn.Module], parallel: ParallelConfig,
                      build: BuildConfig) -> List[DistributedDataParallel]:
    """This rank's bare chunks (`megafox.model.build.build_model`, weights already in) as the
    DDP-wrapped chunks the schedule and the optimizer take. The order is megatron-core's:
    Float16Module, then the GPU, then DDP (which moves the weights into its contiguous buffers)."""
    config = chunks[0].config
    if uses_bf16(build):
        chunks = [Float16Module(config, c) for c in chunks]
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    ddp = wrap_ddp(chunks, config, parallel)
    configure_schedule_hooks(ddp)
    return ddp


def wrap_ddp(chunks: List[torch.nn.Module], config: TransformerConfig,
             parallel: ParallelConfig) -> List[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop applies the configured NaN policy instead
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped


def configure_schedule_hooks(chunks: List[DistributedDataParallel]) -> None:
    """What megatron-core's schedule calls around backward: grad sync and finalization."""
    config = chunks[0].config
    assert config.calculate_per_token_loss, "build the model with megafox.model.build"
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if chunks[0].ddp_config.overlap_grad_reduce:  # as Megatron-LM: only when overlapping
        grad_sync = [c.start_grad_sync for c in chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync


def build_optimizer(chunks: List[DistributedDataParallel], settings: OptimizerSettings,
                    parallel: ParallelConfig, bf16: bool = False):
    config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.beta1, adam_beta2=settings.beta2, adam_eps=settings.eps,
        clip_grad=settings.clip_grad, bf16=bf16, params_dtype=torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    # megatron-core marks norms and biases wd_mult=0 but only its LR scheduler turns that into each
    # group's weight_decay: without a scheduler (tests, benches) the norms would be decayed too
    for group in optimizer.param_groups:
        group["weight_decay"] = settings.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


@contextmanager
def params_gathered(chunks: List[DistributedDataParallel]):
    """The full updated weights on every rank for the duration (a checkpoint save, an export).

    With overlap_param_gather the distributed optimizer's updated shards are all-gathered lazily,
    by forward pre-hooks during the next forward; until then each rank holds only its own shard
    up to date. As Megatron-LM does around its saves: remove the hooks (which gathers
    synchronously) and put them back."""
    hooked = [c for c in chunks if getattr(c, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook()
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
