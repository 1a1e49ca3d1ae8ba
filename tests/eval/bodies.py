"""Multi-rank bodies for the in-loop evaluator tests (run by tests.support.distributed)."""
import dataclasses
from types import SimpleNamespace

import torch
from megatron.core import parallel_state as ps

from megafox.config import BuildConfig, OptimizerConfig, fox1_tiny
from megafox.config import EvalConfig
from megafox.formats.tokenizer import load_tokenizer
from tests.support.layout import current_parallel, gather_hf_weights, load_hf_weights
from megafox.training.callbacks.downstream_eval import DownstreamEvalCallback
from megafox.training.stack import build_training_stack
from megafox.parallel.parallelize import params_gathered
from megafox.training.step import train_step

SEQ, MICRO = 32, 1


class RecordingMetrics:
    """Stands in for the trainer's Metrics: keeps what a callback reports."""

    def __init__(self):
        self.records = []
        self.resets = 0

    def scalars(self, iteration, consumed_tokens, values):
        self.records.append({"iteration": iteration, "consumed_tokens": consumed_tokens, **values})

    def reset_window(self):
        self.resets += 1


def _global_batches(vocab: int, steps: int, global_batch: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (steps, global_batch, SEQ + 1), generator=g)
    return [{"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": torch.ones(global_batch, SEQ)}
            for t in tokens]


def _train(hf_path, tokenizer_path, steps, global_batch, callback, overlap, snapshot_every=None):
    """`steps` optimizer steps from the same weights and batches; `callback.post_step` after each
    one when given, as the trainer calls it. Returns the losses, the logged records and the RNG
    states at the end, and with `snapshot_every` the weights (HF names) after every such step."""
    model = fox1_tiny()
    parallel = dataclasses.replace(current_parallel(use_distributed_optimizer=True), **overlap)
    torch.manual_seed(1234)
    stack = build_training_stack(model, parallel, BuildConfig(precision="fp32"),
                                 OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0),
                                 load_weights=lambda chunks: load_hf_weights(chunks, torch.load(hf_path), model, parallel))
    metrics = RecordingMetrics()
    trainer = SimpleNamespace(model=stack.model, config=SimpleNamespace(model=model), tokenizer=load_tokenizer(tokenizer_path),
                              state=SimpleNamespace(iteration=0, consumed_tokens=0), metrics=metrics,
                              log=lambda message: None)
    if callback is not None:
        callback.on_start(trainer)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses, snapshots = [], {}
    for batch in _global_batches(model.vocab_size, steps, global_batch):
        local = {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}
        micro = [{k: v[i:i + MICRO] for k, v in local.items()} for i in range(0, local["tokens"].shape[0], MICRO)]
        iterator = [iter(micro) for _ in stack.model] if len(stack.model) > 1 else iter(micro)
        result = train_step(stack.model, stack.optimizer, iterator, len(micro), SEQ, MICRO)
        losses.append(result.loss)
        trainer.state.iteration += 1
        trainer.state.consumed_tokens += global_batch * SEQ
        if callback is not None:
            callback.post_step(trainer, result)
        if snapshot_every and trainer.state.iteration % snapshot_every == 0:
            with params_gathered(stack.model):  # the weights the evaluator has just scored
                snapshots[trainer.state.iteration] = gather_hf_weights(stack.model, model, parallel)
    with params_gathered(stack.model):  # with overlap_param_gather, the last update is gathered lazily
        weights = torch.cat([p.detach().reshape(-1).float().clone() for c in stack.model for p in c.parameters()])
    return {"losses": losses, "records": metrics.records, "resets": metrics.resets,
            "torch_rng": torch.get_rng_state(), "weights_sum": float(weights.double().sum()),
            "modes": [c.training for c in stack.model], "snapshots": snapshots}


def with_and_without_evaluator(hf_path, tokenizer_path, task_yaml, data_dir, steps=4, interval=2, global_batch=4,
                               overlap=None):
    overlap = overlap or {}
    plain = _train(hf_path, tokenizer_path, steps, global_batch, None, overlap)
    config = EvalConfig(interval=interval, tasks=[f"{task_yaml}:1"], data_dir=data_dir, limit=8, batch_size=3)
    evaluated = _train(hf_path, tokenizer_path, steps, global_batch, DownstreamEvalCallback(config), overlap,
                       snapshot_every=interval)
    return {"plain": plain, "evaluated": evaluated, "rank": torch.distributed.get_rank()}


def missing_data(tokenizer_path, task_yaml, data_dir):
    """on_start with a task whose data is not staged: every rank raises the same ConfigError."""
    from megafox.config import ConfigError

    trainer = SimpleNamespace(model=[], config=SimpleNamespace(model=fox1_tiny()), log=lambda message: None,
                              tokenizer=load_tokenizer(tokenizer_path))
    callback = DownstreamEvalCallback(EvalConfig(interval=1, tasks=[task_yaml], data_dir=data_dir))
    try:
        callback.on_start(trainer)
    except ConfigError as exc:
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, str(exc))
        return messages
    return None
