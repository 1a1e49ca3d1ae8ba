"""Bodies of the checkpoint tests, run on every rank by tests.support.distributed (not collected
by pytest): train a tiny model a few steps through the trainer's own pieces, save and load
training checkpoints, and report what the tests compare."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import torch
from megatron.core import parallel_state as ps

from megafox.checkpoint.loader import load_training_checkpoint
from megafox.checkpoint.saver import CheckpointSaver, save_training_checkpoint
from megafox.checkpoint.state import layout_signature
from megafox.config import BuildConfig, OptimizerConfig, fox1_tiny
from megafox.records import CheckpointRecord, RunState
from tests.support.layout import current_parallel
from megafox.training.stack import build_training_stack
from megafox.parallel.parallelize import params_gathered
from megafox.training.step import train_step

SEQ, GLOBAL_BATCH, MICRO = 16, 8, 2


def batches(steps: int, vocab: int, seed: int = 5) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(GLOBAL_BATCH, SEQ)})
    return out


def build(precision: str = "fp32", overlap: bool = False, distributed_optimizer: bool = True):
    import dataclasses

    parallel = dataclasses.replace(current_parallel(distributed_optimizer),
                                   **({"overlap_grad_reduce": True, "overlap_param_gather": True,
                                       "ddp_bucket_size": 20000} if overlap else {}))
    torch.manual_seed(1234)
    return build_training_stack(fox1_tiny(), parallel, BuildConfig(precision=precision),
                                OptimizerConfig(lr=1e-2, min_lr=0.0, weight_decay=0.1, clip_grad=1.0))


def step(stack, batch) -> float:
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {k: v.chunk(dp)[rank] for k, v in batch.items()}
    micro = [{k: v[i:i + MICRO] for k, v in local.items()} for i in range(0, local["tokens"].shape[0], MICRO)]
    data = [iter(micro) for _ in stack.model] if len(stack.model) > 1 else iter(micro)
    result = train_step(stack.model, stack.optimizer, data, len(micro), SEQ, MICRO)
    return result.loss


def record(iteration: int) -> CheckpointRecord:
    return CheckpointRecord(iteration=iteration, kind="train", model=fox1_tiny(), layout=layout_signature(),
                            stage="s1", stage_index=0, scheduler={"num_steps": 0}, run_state=RunState(iteration=iteration))


def train_and_save(roots: Dict[str, str], steps: int = 2, precision: str = "fp32", overlap: bool = False,
                   distributed_optimizer: bool = True, async_save: bool = False):
    """Train `steps` steps, then save the same state once per format ({format: root}). Returns
    the bytes of the shard files each rank wrote, per format, and the losses."""
    stack = build(precision, overlap, distributed_optimizer)
    losses = [step(stack, b) for b in batches(steps, fox1_tiny().vocab_size)]
    written = {}
    for fmt, root in roots.items():
        context = params_gathered(stack.model) if fmt == "gathered" else _nothing()
        with context:
            saver = CheckpointSaver(async_save=async_save)
            path = save_training_checkpoint(root, steps, stack.model, stack.optimizer, record(steps),
                                                 format=fmt, saver=saver)
            if async_save:
                assert path is None and saver.pending_iteration == steps
                path = saver.wait().path
        rank = torch.distributed.get_rank()
        written[fmt] = sum(p.stat().st_size for p in Path(path).glob(f"__{rank}_*.distcp"))
    sizes = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(sizes, written)
    return {"written": sizes, "losses": losses}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_and_resave(src: str, dst: str, precision: str = "fp32", overlap: bool = False,
                    distributed_optimizer: bool = True, steps_after: int = 0):
    """Load `src` into a fresh stack of this layout, save it again at `dst` in the `gathered`
    format (megatron-core's own save, the reference); optionally train on and return the losses."""
    stack = build(precision, overlap, distributed_optimizer)
    read_before = _rchar()
    loaded, same_layout = load_training_checkpoint(src, stack.model, stack.optimizer)
    read = _rchar() - read_before
    with params_gathered(stack.model):
        save_training_checkpoint(dst, loaded.iteration, stack.model, stack.optimizer, record(loaded.iteration),
                                      format="gathered")
    losses = [step(stack, b) for b in batches(loaded.iteration + steps_after, fox1_tiny().vocab_size)[loaded.iteration:]]
    reads = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reads, read)
    return {"losses": losses, "read": reads, "same_layout": same_layout}


def continue_training(steps_total: int, precision: str = "fp32", overlap: bool = False,
                      distributed_optimizer: bool = True):
    """The uninterrupted run's losses for steps 1..steps_total."""
    stack = build(precision, overlap, distributed_optimizer)
    return [step(stack, b) for b in batches(steps_total, fox1_tiny().vocab_size)]


def _rchar() -> int:
    with open(f"/proc/{os.getpid()}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
