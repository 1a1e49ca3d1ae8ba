"""Test bodies run on several ranks by tests.support.distributed (not collected by pytest)."""
import dataclasses

import torch
from megatron.core import parallel_state as ps

from megafox.config import BuildConfig, OptimizerConfig, fox1_tiny
from tests.support.layout import current_parallel, gather_hf_weights, load_hf_weights
from megafox.training.stack import build_training_stack
from megafox.parallel.parallelize import params_gathered
from megafox.training.step import train_step


def one_step(hf_path, batch_path, micro_batch_size, impl="native", use_distributed_optimizer=True,
             nan_grad_rank=None, steps=1, overlap=None, options=None):
    """Load the same HF weights, take `steps` optimizer steps on the same global batch.
    `nan_grad_rank`: that rank's gradient of its first parameter becomes NaN (the loss stays finite).
    `overlap`: ParallelConfig overlap fields (overlap_grad_reduce, overlap_param_gather, ddp_bucket_size);
    `options`: BuildConfig fields."""
    model = fox1_tiny()
    model.transformer_impl = impl
    parallel = dataclasses.replace(current_parallel(use_distributed_optimizer), **(overlap or {}))
    hf = torch.load(hf_path)
    # Adam's first step is lr * g / (|g| + eps): with a tiny eps it is ~lr * sign(g), so rounding
    # noise in near-zero grads would flip whole updates. eps = 1 keeps it linear in g, so the
    # comparison checks the sharded grads and optimizer, not the sign of noise.
    settings = OptimizerConfig(lr=0.5, eps=1.0, weight_decay=0.01, clip_grad=1.0)
    stack = build_training_stack(model, parallel, BuildConfig(**(options or {})), settings,
                                 load_weights=lambda chunks: load_hf_weights(chunks, hf, model, parallel))
    ddp, optimizer = stack.model, stack.optimizer

    batch = torch.load(batch_path)  # tokens/labels/loss_mask: [global_batch, seq]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}
    n_micro = local["tokens"].shape[0] // micro_batch_size
    micro = [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in local.items()}
             for i in range(n_micro)]
    if nan_grad_rank == torch.distributed.get_rank():
        next(ddp[0].module.parameters()).register_hook(lambda grad: grad * float("nan"))
    for _ in range(steps):
        iterators = [iter(micro) for _ in ddp] if len(ddp) > 1 else iter(micro)
        result = train_step(ddp, optimizer, iterators, n_micro, batch["tokens"].shape[1], micro_batch_size)
    with params_gathered(ddp):
        weights = gather_hf_weights(ddp, model, parallel)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "tokens": result.num_tokens, "weights": weights,
            "skipped": result.skipped}
