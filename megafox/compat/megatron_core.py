"""Every workaround megafox needs for megatron-core 0.16, in one place.

Upgrading megatron-core: run `make test` (tests/compat checks the installed version against each
range below), then for each workaround read its upstream reference: drop it where the release
has the fix, widen its range where the bug is still there.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List

import torch

from megafox.checkpoint.safe_load import SafeFileSystemReader, SafeLoadBytesMixin, safe_torch_load


@dataclass(frozen=True)
class Workaround:
    name: str
    versions: str  # a PEP 440 specifier set of megatron-core versions it applies to
    upstream: str  # the upstream issue / pull request, or what was searched for and not found


WORKAROUNDS: List[Workaround] = []


def _workaround(name: str, versions: str, upstream: str):
    WORKAROUNDS.append(Workaround(name, versions, upstream))
    return lambda fn: fn


# Overrides of megatron-core internals that are whole features, kept with the code they serve but
# listed here so an upgrade reviews them with the rest.
WORKAROUNDS.append(Workaround(
    "safe_index_cache (megafox/data/index_cache.py: GPTDataset._build_document_sample_shuffle_indices, "
    "BlendedDataset._build_indices, BlendedMegatronDatasetBuilder._build_megatron_datasets_parallel)",
    ">=0.16,<0.17",
    "none found upstream (searched 2026-11-30): 0.16 reads its sample-index cache with numpy "
    "allow_pickle=True, writes it under final names, and has every rank wait for rank 0's build in a "
    "process-group barrier that times out on Fox-1's stage-1 index"))


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
# dist_checkpointing's write results: an in-process queue (megafox writes in threads)

@_workaround("write_results_in_process", ">=0.16,<0.17",
             "none found upstream (searched 2026-11-30): filesystem_async's write results always go through "
             "a multiprocessing Manager it spawns on first use, which dies of the SIGUSR1 srun sends")
def write_results_in_process() -> None:
    """Give filesystem_async an in-process results queue before its first save.

    megafox runs the writing in threads of the training process (megafox.checkpoint.writer), so
    results never cross a process boundary; megatron-core would otherwise spawn a long-lived
    Manager process for them, which dies of the first SIGUSR1 srun forwards to the job step (the
    next save then fails with a BrokenPipeError), and which outlives a rank killed -9."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


# ----------------------------------------------------------------------------------------------
# Loading: nothing from a checkpoint file may run code (issue 17)

@_workaround("safe_checkpoint_loading", ">=0.16,<0.17",
             "pytorch/pytorch#189308 '`.metadata` loaded with raw pickle.load on the public load() path' (open); "
             "DCP's DefaultLoadPlanner.load_bytes also uses torch.load(weights_only=False); megatron-core 0.16 "
             "inherits both and loads common.pt with torch.load defaults")
@contextmanager
def safe_checkpoint_loading():
    """For the duration, every file megatron-core's torch_dist load strategy unpickles is read as
    data only (megafox.checkpoint.safe_load): DCP's `.metadata` index (plain `pickle.load` in torch's
    FileSystemReader), the ShardedObjects such as the RNG state (DCP's DefaultLoadPlanner loads
    them with `torch.load(weights_only=False)`), and `common.pt` (torch.load defaults, which an
    environment variable can turn off). A file that names anything else raises
    UnsafeCheckpointError naming the file, before the reference is imported or called."""
    from megatron.core.dist_checkpointing.strategies import common as common_strategy
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    global _safe_loading_active
    if _safe_loading_active:
        yield  # nested (a load inside a load): already in place
        return

    class SafeMCoreLoadPlanner(SafeLoadBytesMixin, torch_strategy.MCoreLoadPlanner):
        pass

    def safe_reader(checkpoint_dir, cache_metadata: bool = False):
        return SafeFileSystemReader(checkpoint_dir)

    def load_common(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, common_strategy.COMMON_STATE_FNAME)
        if not os.path.isfile(path):
            from megatron.core.dist_checkpointing.core import CheckpointingException

            raise CheckpointingException(f"Common file {path} does not exist")
        return safe_torch_load(path)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

        def one(sh_obj):
            return safe_torch_load(os.path.join(checkpoint_dir, f"{sh_obj.unique_key}.pt"))

        return dict_list_map_inplace(one, sharded_objects_state_dict)

    patches = [(torch_strategy, "_get_filesystem_reader", safe_reader),
               (torch_strategy, "MCoreLoadPlanner", SafeMCoreLoadPlanner),
               (common_strategy.TorchCommonLoadStrategy, "load_common", load_common),
               (common_strategy.TorchCommonLoadStrategy, "load_sharded_objects", load_sharded_objects)]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    _safe_loading_active = True
    try:
        yield
    finally:
        _safe_loading_active = False
        for owner, name, value in saved:
            setattr(owner, name, value)


_safe_loading_active = False
