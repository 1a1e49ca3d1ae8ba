"""Bodies of the independent-claims tests, run on every rank by tests.support.distributed
(not collected by pytest). They train through the trainer's own pieces (build_training_stack with
the run's TrainConfig, so megatron-core's param groups get their weight decay from the LR
scheduler as in the trainer; train_step; save/load_training_checkpoint) and hand back what the
tests compare in HF-keyed, unsharded space."""
import dataclasses
from typing import Dict, List

import torch
from megatron.core import parallel_state as ps

from megafox.checkpoint.loader import load_training_checkpoint
from megafox.checkpoint.saver import save_training_checkpoint
from megafox.checkpoint.state import layout_signature, unwrap
from megafox.config import (BuildConfig, ModelConfig, OptimizerConfig, ScheduleConfig, StageConfig, TrainConfig,
                            fox1_tiny)
from megafox.model.hf_mapping import megatron_to_hf
from megafox.records import CheckpointRecord, RunState, config_mapping
from tests.support.layout import current_parallel, gather_hf_weights, layout_of, load_hf_weights, my_key
from megafox.training.stack import build_training_stack
from megafox.parallel.parallelize import params_gathered
from megafox.training.step import train_step

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def tiny_model(vocab_size: int) -> ModelConfig:
    model = fox1_tiny()
    model.vocab_size = vocab_size
    return model


def run_config(model: ModelConfig, parallel, settings: OptimizerConfig, seq: int, global_batch: int,
               steps: int, micro_batch_size: int) -> TrainConfig:
    """A one-stage run whose schedule is constant at `settings.lr` (the schedule has its own test)."""
    stage = StageConfig(name="s1", seq_length=seq, token_budget=steps * global_batch * seq,
                        batch_tokens=global_batch * seq, data="unused/blend.json")
    return TrainConfig(model=model, stages=[stage], parallel=parallel, optimizer=settings,
                       schedule=ScheduleConfig(style="constant"), micro_batch_size=micro_batch_size).validate()


def local_micro_batches(batch: Dict[str, torch.Tensor], micro_batch_size: int):
    """This DP rank's contiguous share of the global batch, cut into micro-batches."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}
    n = local["tokens"].shape[0] // micro_batch_size
    return [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in local.items()} for i in range(n)]


def one_training_step(stack, batch, micro_batch_size: int):
    """What the trainer's step does: schedule first (tokens of this batch), then train_step."""
    micro = local_micro_batches(batch, micro_batch_size)
    stack.scheduler.step(increment=batch["tokens"].numel())
    data = [iter(micro) for _ in stack.model] if len(stack.model) > 1 else iter(micro)
    result = train_step(stack.model, stack.optimizer, data, len(micro), batch["tokens"].shape[1], micro_batch_size)
    assert not result.skipped
    return result


def _run_of(model, parallel, settings, batches, micro_batch_size, overlap=None):
    """The run's TrainConfig and the layout with `overlap` (ParallelConfig overlap fields) applied."""
    parallel = dataclasses.replace(parallel, **(overlap or {}))
    seq, gbs = batches[0]["tokens"].shape[1], batches[0]["tokens"].shape[0]
    return run_config(model, parallel, settings, seq, gbs, len(batches) + 1, micro_batch_size), parallel


def _build(model, parallel, settings, batches, micro_batch_size, hf=None, overlap=None):
    run, parallel = _run_of(model, parallel, settings, batches, micro_batch_size, overlap)
    load = (lambda chunks: load_hf_weights(chunks, hf, model, parallel)) if hf is not None else None
    return build_training_stack(model, parallel, BuildConfig(precision="fp32"), settings, load_weights=load,
                                run=run), run, parallel


def train_steps(hf_path, batches_path, micro_batch_size, vocab_size, settings):
    """Load HF weights, take one optimizer step per batch; loss, grad norm and weights after each."""
    model, parallel = tiny_model(vocab_size), current_parallel()
    batches = torch.load(batches_path)
    stack, _, parallel = _build(model, parallel, OptimizerConfig(**settings), batches, micro_batch_size,
                                hf=torch.load(hf_path))
    out = []
    for batch in batches:
        result = one_training_step(stack, batch, micro_batch_size)
        with params_gathered(stack.model):
            weights = gather_hf_weights(stack.model, model, parallel)
        out.append({"loss": result.loss, "grad_norm": result.grad_norm, "tokens": result.num_tokens,
                    "weights": weights})
    return out


def train_runs(runs):
    """Several `train_steps` runs in one process (each builds its own stack): one torchrun start."""
    return [train_steps(**run) for run in runs]


# ----------------------------------------------------------------------------------------------
# optimizer state in HF-keyed, unsharded space

def _inner_optimizers(optimizer) -> List[object]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _param_state(optimizer, param: torch.nn.Parameter):
    """This rank's part of `param`'s fp32 main param / exp_avg / exp_avg_sq / step, and where it
    sits in the flattened parameter. The distributed optimizer keeps a contiguous range of each
    parameter per DP rank (megatron-core's param_range_map); elsewhere the state is whole."""
    for inner in _inner_optimizers(optimizer):
        if hasattr(inner, "model_param_gbuf_map"):  # DistributedOptimizer
            if param in inner.model_param_gbuf_map:
                where = inner._get_model_param_range_map(param)["param"]
                return inner._get_main_param_and_optimizer_states(param), where.start, where.end
        else:  # FP32Optimizer: the model param is its own main param
            for group in inner.optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return dict(param=param, **inner.optimizer.state[param]), 0, param.numel()
    return None, 0, 0


def gather_optimizer_state(stack, model: ModelConfig, parallel):
    """{"param"|"exp_avg"|"exp_avg_sq": HF state dict} on rank 0 (None elsewhere), plus every
    rank's Adam step counts. Each parameter's DP shards are summed into zeros (exact), and every
    element must come from exactly one DP rank."""
    group = ps.get_data_parallel_group()
    mine: Dict[str, Dict] = {key: {} for key in STATE_KEYS}
    steps = set()
    for vp, chunk in enumerate(stack.model):
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            state, start, end = _param_state(stack.optimizer, param)
            full = torch.zeros(len(STATE_KEYS) + 1, param.numel(), dtype=torch.float32)
            if state is not None:
                for i, key in enumerate(STATE_KEYS):
                    full[i, start:end] = state[key].detach().float().view(-1)
                full[-1, start:end] = 1.0
                if "step" in state:
                    steps.add(float(state["step"]))
            torch.distributed.all_reduce(full, group=group)
            assert torch.all(full[-1] == 1.0), f"{name}: DP shards do not cover it exactly once"
            for i, key in enumerate(STATE_KEYS):
                mine[key].setdefault(my_key(vp), {})[name] = full[i].view(param.shape).clone()
    gathered = [None] * torch.distributed.get_world_size()
    send = mine if ps.get_data_parallel_rank() == 0 else {key: {} for key in STATE_KEYS}
    torch.distributed.all_gather_object(gathered, (send, sorted(steps)))
    if torch.distributed.get_rank() != 0:
        return None
    out = {}
    for key in STATE_KEYS:
        ranks = {k: v for part, _ in gathered for k, v in part[key].items()}
        out[key] = megatron_to_hf(ranks, model, layout_of(parallel))
    out["steps"] = sorted({s for _, rank_steps in gathered for s in rank_steps})
    return out


def _record(run: TrainConfig, stack, iteration: int, tokens: int) -> CheckpointRecord:
    """As megafox.training.checkpoints builds it."""
    stage = run.stages[0]
    return CheckpointRecord(
        iteration=iteration, kind="train", model=run.model, layout=layout_signature(),
        stage=stage.name, stage_index=0, stage_end=False, seq_length=stage.seq_length,
        global_batch_size=stage.global_batch_size, scheduler=stack.scheduler.state_dict(),
        run_state=RunState(iteration=iteration, consumed_tokens=tokens,
                           consumed_samples={stage.name: iteration * stage.global_batch_size}),
        config=config_mapping(run))


def _weights(stack, model, parallel):
    with params_gathered(stack.model):
        return gather_hf_weights(stack.model, model, parallel)


def _snapshot(stack, model, parallel):
    return {"state": gather_optimizer_state(stack, model, parallel), "weights": _weights(stack, model, parallel)}


def _step(stack, batch, micro_batch_size, model, parallel):
    result = one_training_step(stack, batch, micro_batch_size)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "weights": _weights(stack, model, parallel)}


def _resume(root, model, parallel, settings, batches, micro_batch_size, overlap):
    """A new stack (its own random initial weights) resumed from `root` as the trainer resumes:
    load_training_checkpoint, then the scheduler from the record."""
    stack, _, _ = _build(model, parallel, settings, batches, micro_batch_size, overlap=overlap)
    record, _ = load_training_checkpoint(root, stack.model, stack.optimizer)
    stack.scheduler.load_state_dict(record.scheduler)
    assert stack.scheduler.num_steps == record.run_state.consumed_tokens
    return stack, record.iteration


def resume_cycle(batches_path, micro_batch_size, vocab_size, settings, hf_path=None, root_in=None, root_out=None,
                 steps_before_save=0, overlap=None):
    """At this rank layout: start from HF weights or resume from `root_in` (then `loaded` is the
    state right after loading); train `steps_before_save` steps (`steps`, one batch each, in run
    order); with `root_out`: save (`saved`), take the next step (`after_save`, the uninterrupted
    run), resume a fresh stack from that checkpoint (`reloaded`) and take the same step again
    (`after_reload`)."""
    model, parallel = tiny_model(vocab_size), current_parallel()
    settings = OptimizerConfig(**settings)
    batches = torch.load(batches_path)
    out = {}
    if root_in is None:
        stack, run, used = _build(model, parallel, settings, batches, micro_batch_size, hf=torch.load(hf_path),
                                  overlap=overlap)
        iteration = 0
    else:
        stack, iteration = _resume(root_in, model, parallel, settings, batches, micro_batch_size, overlap)
        run, used = _run_of(model, parallel, settings, batches, micro_batch_size, overlap)
        out["loaded"] = _snapshot(stack, model, used)
    out["steps"] = []
    for _ in range(steps_before_save):
        out["steps"].append(_step(stack, batches[iteration], micro_batch_size, model, used))
        iteration += 1
    if root_out is not None:
        out["saved"] = _snapshot(stack, model, used)
        with params_gathered(stack.model):
            save_training_checkpoint(root_out, iteration, stack.model, stack.optimizer,
                                          _record(run, stack, iteration, int(stack.scheduler.num_steps)))
        out["after_save"] = _step(stack, batches[iteration], micro_batch_size, model, used)
        fresh, resumed_at = _resume(root_out, model, parallel, settings, batches, micro_batch_size, overlap)
        assert resumed_at == iteration
        out["reloaded"] = _snapshot(fresh, model, used)
        out["after_reload"] = _step(fresh, batches[iteration], micro_batch_size, model, used)
    return out
