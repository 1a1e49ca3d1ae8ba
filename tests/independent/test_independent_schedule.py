"""The trainer's LR schedule equals its closed form at every step of a whole curriculum.

The scheduler is megafox.training.schedule.build_scheduler over a real config (configs/train/
tiny.yaml with overrides giving each stage its own batch size, a non-zero init_lr and a decay that
starts mid-stage), stepped as the trainer steps it: `step(increment=stage.batch_tokens)` before
each optimizer step, stage after stage. The closed forms are written here from their definitions,
in tokens: linear warmup from init_lr to lr over warmup_tokens, then
  cosine: min + (max - min) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))
  linear: min + (max - min) * (1 - (t - W) / (T - W))
  wsd:    max until T - D, then over the last D tokens the decay style (linear or cosine) to min
with T the tokens the curriculum trains (whole batches), W warmup, D decay_tokens.
"""
import math
from types import SimpleNamespace

import pytest

from megafox.config import load_train_config
from megafox.training.schedule import build_scheduler
from tests.support.processes import REPO

TINY = REPO / "configs" / "train" / "tiny.yaml"

# Stage batches of 2048, 4096 and 1024 tokens; stage1's budget is not a whole number of batches
# (the trainer trains 32 batches = 65536 tokens of it); warmup ends after 3 steps; wsd's decay of
# 20480 tokens starts 7 steps into stage2 (at 94208), not on a stage boundary.
OVERRIDES = [
    "optimizer.lr=3.0e-3", "optimizer.min_lr=2.0e-4", "optimizer.weight_decay=0.1",
    "schedule.init_lr=3.0e-4", "schedule.warmup_tokens=6144",
    "stages.stage1.batch_tokens=2048", "stages.stage1.token_budget=66000",
    "stages.stage2.batch_tokens=4096", "stages.stage2.token_budget=32768",
    "stages.stage3.batch_tokens=1024", "stages.stage3.token_budget=16384",
]
STYLES = {
    "cosine": ["schedule.style=cosine", "schedule.decay_tokens=null"],
    "linear": ["schedule.style=linear", "schedule.decay_tokens=null"],
    "wsd_linear": ["schedule.style=wsd", "schedule.decay_tokens=20480", "schedule.wsd_decay_style=linear"],
    "wsd_cosine": ["schedule.style=wsd", "schedule.decay_tokens=20480", "schedule.wsd_decay_style=cosine"],
}
TOTAL, WARMUP, DECAY = 65536 + 32768 + 16384, 6144, 20480
LR, MIN_LR, INIT_LR, WD = 3.0e-3, 2.0e-4, 3.0e-4, 0.1


def closed_form(style: str, t: int) -> float:
    if t <= WARMUP:
        return INIT_LR + (LR - INIT_LR) * t / WARMUP
    if style in ("cosine", "linear"):
        r = (t - WARMUP) / (TOTAL - WARMUP)
        coeff = 0.5 * (1 + math.cos(math.pi * r)) if style == "cosine" else 1 - r
    else:
        start = TOTAL - DECAY
        if t <= start:
            return LR
        r = (t - start) / DECAY
        coeff = 1 - r if style == "wsd_linear" else 0.5 * (1 + math.cos(math.pi * r))
    return MIN_LR + (LR - MIN_LR) * coeff


def megatron_like_optimizer():
    """What the scheduler touches: megatron-core's param groups (max/min lr, and wd_mult 0 for the
    norms' group, 1 for the matrices')."""
    groups = [{"params": [], "wd_mult": 1.0, "lr_mult": 1.0, "max_lr": LR, "min_lr": MIN_LR},
              {"params": [], "wd_mult": 0.0, "lr_mult": 1.0, "max_lr": LR, "min_lr": MIN_LR}]
    return SimpleNamespace(param_groups=groups)


def run_curriculum(config, scheduler):
    """(tokens consumed, lr the step trained at, step's stage) for every step, as the trainer runs."""
    t, out = 0, []
    for stage in config.stages:
        for _ in range(stage.num_steps):
            scheduler.step(increment=stage.batch_tokens)
            t += stage.batch_tokens
            groups = scheduler.optimizer.param_groups
            assert groups[0]["weight_decay"] == pytest.approx(WD) and groups[1]["weight_decay"] == 0.0
            assert groups[0]["lr"] == groups[1]["lr"]
            out.append((t, groups[0]["lr"], stage.name))
    return out


@pytest.fixture(params=list(STYLES))
def style(request):
    return request.param


@pytest.fixture
def config(style):
    return load_train_config(TINY, OVERRIDES + STYLES[style])


def test_config_is_the_curriculum_the_closed_form_assumes(config):
    assert config.total_tokens == TOTAL
    assert [s.batch_tokens for s in config.stages] == [2048, 4096, 1024]
    assert [s.num_steps for s in config.stages] == [32, 8, 16]


def test_lr_equals_closed_form_at_every_step(config, style):
    steps = run_curriculum(config, build_scheduler(megatron_like_optimizer(), config))
    for t, lr, stage in steps:
        assert lr == pytest.approx(closed_form(style, t), rel=1e-12, abs=1e-15), (style, stage, t)
    lr_at = {t: lr for t, lr, _ in steps}
    # the points a wrong schedule gets wrong first are all among the steps
    stage_ends = [65536, 65536 + 32768, TOTAL]
    assert WARMUP in lr_at and all(end in lr_at for end in stage_ends)
    assert lr_at[2048] == pytest.approx(INIT_LR + (LR - INIT_LR) / 3)  # the first step already warms up
    assert lr_at[WARMUP] == pytest.approx(LR)
    assert lr_at[TOTAL] == pytest.approx(MIN_LR)  # the decay ends on the run's last step
    assert max(lr_at.values()) == pytest.approx(LR)
    if style.startswith("wsd"):
        decay_start = TOTAL - DECAY
        assert decay_start in lr_at and decay_start not in stage_ends
        assert lr_at[decay_start] == pytest.approx(LR)
        assert lr_at[decay_start + 4096] < LR  # the next step (stage2 batches) decays
        assert all(lr == pytest.approx(LR) for t, lr in lr_at.items() if WARMUP <= t <= decay_start)
    else:
        assert lr_at[WARMUP + 2048] < LR  # decay starts right after warmup


def test_resumed_scheduler_continues_the_same_schedule(config):
    """The trainer resumes with a fresh scheduler (built from the config) loaded with the
    checkpoint's scheduler state: from any step, across stage boundaries too, the LRs continue
    unchanged."""
    increments = [s.batch_tokens for s in config.stages for _ in range(s.num_steps)]

    def lrs(scheduler, steps):
        out = []
        for increment in steps:
            scheduler.step(increment=increment)
            out.append(scheduler.optimizer.param_groups[0]["lr"])
        return out

    reference = lrs(build_scheduler(megatron_like_optimizer(), config), increments)
    for resume_after in (2, 32, 39, 40, 55):  # mid warmup, stage1 end, wsd decay start, stage2 end, last
        first = build_scheduler(megatron_like_optimizer(), config)
        before = lrs(first, increments[:resume_after])
        resumed = build_scheduler(megatron_like_optimizer(), config)
        resumed.load_state_dict(first.state_dict())
        assert resumed.num_steps == sum(increments[:resume_after])
        assert before + lrs(resumed, increments[resume_after:]) == reference
