"""Every workaround megafox needs for megatron-core 0.16, in one place.

Upgrading megatron-core: run `make test` (tests/compat checks the installed version against each
range below), then for each workaround read its upstream reference: drop it where the release
has the fix, widen its range where the bug is still there.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from megafox.signals import STOP_SIGNALS


@dataclass(frozen=True)
class Workaround:
    name: str
    versions: str  # a PEP 440 specifier set of megatron-core versions it applies to
    upstream: str  # the upstream issue / pull request, or what was searched for and not found


WORKAROUNDS: List[Workaround] = []


def _workaround(name: str, versions: str, upstream: str):
    WORKAROUNDS.append(Workaround(name, versions, upstream))
    return lambda fn: fn


def installed_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


# ----------------------------------------------------------------------------------------------
# Distributed optimizer: `fully_reshardable` save shifts the state of every bucket after a padded one

@_workaround("optimizer_state_in_buffer_coordinates", ">=0.16,<0.17",
             "NVIDIA/Megatron-LM PR #5077 'Fix bugs in re-sharding DistributedOptimizer state in torch_dist "
             "checkpoint' (merged 2026-05-31, after 0.16.1)")
@contextmanager
def optimizer_state_in_buffer_coordinates(optimizer):
    """`get_parameter_state_dp_zero` concatenates the DDP buckets of a buffer without the padding at
    the end of each bucket, but `sharded_param_state_fully_reshardable` cuts each parameter's state
    out of that at the parameter's position in the padded buffer. With more than one bucket
    (overlap_grad_reduce, or the separate bucket of a tied embedding with PP > 1) and a bucket end
    that needed padding (a DP size that is not a power of two, small parameters), every parameter
    after the first padded bucket gets a shifted slice of the optimizer state, fp32 weights
    included. Here each bucket is put back at its offset in the buffer."""
    parts = [p for p in getattr(optimizer, "chained_optimizers", [optimizer])
             if hasattr(p, "get_parameter_state_dp_zero") and hasattr(p, "buffers")]
    originals = [p.get_parameter_state_dp_zero for p in parts]

    def padded(part, original):
        def get_parameter_state_dp_zero(*args, **kwargs):
            state = original(*args, **kwargs)
            if state is None:
                return state
            for gbuf_idx, buffer in enumerate(part.buffers):
                if all(b.grad_data.numel() == b.numel_unpadded for b in buffer.buckets[:-1]):
                    continue  # no padding before the last bucket: positions already agree
                for world in state[gbuf_idx].values():
                    for key in ("param", "exp_avg", "exp_avg_sq"):
                        unpadded, out, start = world[key], torch.zeros(buffer.numel, dtype=world[key].dtype), 0
                        for bucket in buffer.buckets:
                            out[bucket.offset:bucket.offset + bucket.numel_unpadded] = \
                                unpadded[start:start + bucket.numel_unpadded]
                            start += bucket.numel_unpadded
                        world[key] = out
            return state
        return get_parameter_state_dp_zero

    for part, original in zip(parts, originals):
        part.get_parameter_state_dp_zero = padded(part, original)
    try:
        yield
    finally:
        for part in parts:
            del part.get_parameter_state_dp_zero  # the class's method again


# ----------------------------------------------------------------------------------------------
# Torch Adam (megatron-core's fallback without Apex/TE) and the distributed optimizer's state dict

@_workaround("init_torch_adam_state", ">=0.16,<0.17",
             "none found upstream (searched 2026-11-30): DistributedOptimizer.state_dict() asserts one "
             "common 'step' and fails on a torch Adam that has not stepped")
def init_torch_adam_state(optimizer) -> None:
    """Give a fresh torch Adam a full state, 'step' included, so the distributed optimizer's
    state_dict() works before the first step. The loaded checkpoint overwrites every value."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if len(torch_opt.state[p]) == 0:
                    torch_opt.state[p]["step"] = torch.tensor(0.0)
                    torch_opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    torch_opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


@_workaround("load_optimizer_state", ">=0.16,<0.17",
             "none found upstream (searched 2026-11-30): load_parameter_state_from_fully_reshardable "
             "copies every live state key, 'step' included, from checkpoint tensors that never hold it")
def load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """optimizer.load_state_dict with torch Adam (no Apex/TE): the fully_reshardable loader raises
    KeyError('step') because 'step' lives in the param groups, not in the saved tensors. So load
    the param groups (and step) first, then the tensors with 'step' briefly set aside."""
    chained = getattr(optimizer, "chained_optimizers", None)
    inner = chained[0] if chained and len(chained) == 1 else optimizer
    param_state = state.get("param_state") if isinstance(state, dict) else None
    if (state.get("param_state_sharding_type") != "fully_reshardable" or param_state is None
            or not hasattr(inner, "load_parameter_state_from_fully_reshardable")):
        optimizer.load_state_dict(state)
    else:
        rest = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
        inner.load_state_dict(rest)
        torch_state = inner.optimizer.state
        steps = {p: st.pop("step") for p, st in torch_state.items() if "step" in st}
        try:
            inner.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                torch_state[p]["step"] = step
    unalias_adam_steps(optimizer)


@_workaround("unalias_adam_steps", ">=0.16,<0.17",
             "none found upstream (searched 2026-11-30): the loader gives every parameter the same 'step' tensor")
def unalias_adam_steps(optimizer) -> None:
    """megatron-core's loader gives every parameter the SAME 'step' tensor; torch Adam then adds 1
    per parameter per step to it, corrupting bias correction (and rank-dependent: ranks hold
    different parameter counts). One tensor per parameter, as a fresh Adam has."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if isinstance(torch_opt, torch.optim.Optimizer):
            for st in torch_opt.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].detach().clone()


# ----------------------------------------------------------------------------------------------
# dist_checkpointing's long-lived writer process and the stop signals

@_workaround("start_writer_processes_shielded", ">=0.16,<0.17",
             "none found upstream (searched 2026-11-30): filesystem_async's results-queue manager is "
             "spawned with default signal dispositions and dies of a SIGUSR1 srun sends to the job step")
def start_writer_processes_shielded() -> None:
    """Start dist_checkpointing's long-lived results-queue manager with the stop signals blocked.

    The manager process is spawned once and reused by every later save. Started with the default
    dispositions it dies of the first SIGUSR1 srun forwards to every process of the step, and the
    next save fails with a BrokenPipeError. A blocked mask is inherited through fork and exec, so
    the manager never sees these signals, and blocking (unlike ignoring) loses none for the
    trainer: they stay pending and arrive as soon as the mask is restored.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
