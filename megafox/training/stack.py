"""One function builds what a training step needs: model chunks, DDP, optimizer, LR scheduler.

torchtitan's train set-up and OLMo-core's TrainModule are the anchors: the trainer, the
throughput benchmark and the tests all build through `build_training_stack`, so they train the
same thing. The order is fixed by megatron-core: build the chunks (one TransformerConfig shared
by all of them), put initial weights in (`load_weights`, e.g. mapped HF weights in tests), apply
the parallelism (`megafox.parallel.parallelize`: bf16, device, DDP, the schedule's grad sync),
then the optimizer over the DDP chunks and the LR schedule over the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megafox.config import BuildConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from megafox.model.build import build_model, uses_bf16
from megafox.parallel.parallelize import build_optimizer, parallelize_model
from megafox.training.schedule import build_scheduler


@dataclass
class TrainingStack:
    model: List[torch.nn.Module]  # this rank's DDP-wrapped chunks (one per virtual pipeline stage)
    optimizer: object  # megatron-core MegatronOptimizer (distributed or not, chained or not)
    config: TransformerConfig  # the one TransformerConfig every chunk was built with
    build: BuildConfig
    scheduler: Optional[object] = None  # megatron-core OptimizerParamScheduler, counted in tokens


def build_training_stack(model: ModelConfig, parallel: ParallelConfig, build: BuildConfig = BuildConfig(),
                         optimizer: OptimizerConfig = OptimizerConfig(),
                         load_weights: Optional[Callable[[List[torch.nn.Module]], None]] = None,
                         run: Optional[TrainConfig] = None) -> TrainingStack:
    """The stack for this rank; megatron-core's parallel state must be initialized.

    `load_weights(chunks)` runs on the bare chunks before any wrapping. `run` (the whole training
    config) adds the run's LR schedule, counted in tokens over its curriculum.
    """
    chunks = build_model(model, parallel, build)
    config = chunks[0].config
    if load_weights is not None:
        load_weights(chunks)
    ddp = parallelize_model(chunks, parallel, build)
    opt = build_optimizer(ddp, optimizer, parallel, bf16=uses_bf16(build))
    scheduler = build_scheduler(opt, run) if run is not None else None
    return TrainingStack(model=ddp, optimizer=opt, config=config, build=build, scheduler=scheduler)
