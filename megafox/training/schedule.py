"""The learning-rate schedule over the whole curriculum, counted in tokens.

megatron-core's OptimizerParamScheduler counts abstract "steps"; here one step is one token, so
stages with different batch sizes and sequence lengths share one schedule, and a stage change
never resets it. The trainer calls `step(increment=batch_tokens)` before each optimizer step, so
the first step already trains at a non-zero warmup LR and `num_steps` always equals the tokens
consumed (including the batch being trained).
"""
from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megafox.config import TrainConfig

_STYLE = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def build_scheduler(optimizer, config: TrainConfig) -> OptimizerParamScheduler:
    sc, opt = config.schedule, config.optimizer
    total = config.total_tokens
    return OptimizerParamScheduler(
        optimizer,
        init_lr=sc.init_lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=sc.warmup_tokens,
        lr_decay_steps=total,
        lr_decay_style=_STYLE[sc.style],
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        # The config is the authority on the schedule's shape; the checkpoint supplies only the
        # position (tokens so far), so a corrected config takes effect on resume.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=sc.decay_tokens if sc.style == "wsd" else None,
        lr_wsd_decay_style=sc.wsd_decay_style if sc.style == "wsd" else None,
    )


def current_lr(scheduler: OptimizerParamScheduler) -> float:
    groups = scheduler.optimizer.param_groups
    return float(groups[0]["lr"]) if groups else float("nan")
