"""megafox checkpoints: megatron-core dist_checkpointing (torch_dist) plus a small metadata file.

Layout of a checkpoint root:
    ROOT/iter_0000100/          dist_checkpointing directory (model [+ optimizer] shards)
    ROOT/iter_0000100/megafox.json   metadata, written last: its presence marks the save complete
    ROOT/latest                 text file naming the newest complete iteration, replaced atomically

Shared by the trainer and `checkpoints_tools`, so it sits below both. dist_checkpointing stores
global (unsharded) tensor layouts, so a checkpoint saved at one TP/PP loads at another.

Training checkpoints (`save_training_checkpoint`) add the optimizer state (the distributed
optimizer in the `fully_reshardable` format: one global tensor per parameter, so it
reloads at any TP/PP/DP), every rank's RNG states, and in megafox.json the scheduler position
and the data state (consumed samples per stage). Old ones are rotated: the newest `keep_last`
plus every stage end are kept.
"""
from __future__ import annotations

from contextlib import contextmanager

import dataclasses
import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from megafox.training.signals import STOP_SIGNALS

FORMAT = "megafox-dist-v1"
METADATA_FILE = "megafox.json"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or not a megafox checkpoint. Names the path."""


def iteration_dir(root: Union[str, Path], iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """Keys as Megatron-LM uses them: `model`, or `model0`, `model1`... with virtual pipeline."""
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_latest(root: Union[str, Path], iteration: int) -> None:
    """Point `latest` at `iteration` atomically (write a temp file, fsync, rename)."""
    root = Path(root)
    tmp = root / f".{LATEST_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)


def save_checkpoint(root: Union[str, Path], iteration: int, chunks: List[torch.nn.Module],
                    metadata: Dict[str, Any], extra_sharded: Optional[Dict[str, Any]] = None,
                    update_latest: bool = True) -> Path:
    """Save model chunks (and any extra sharded state, e.g. the optimizer's) collectively.

    Every rank calls this. `metadata` (JSON-serializable) is written by rank 0 after all shards
    are on disk, and only then does `latest` move.
    """
    state = model_sharded_state_dict(chunks)
    if extra_sharded:
        state.update(extra_sharded)
    return _save_state(root, iteration, state, metadata, update_latest)


# The signals the trainer turns into "save and exit" (STOP_SIGNALS) reach every process of a SLURM
# job step, including the helper processes dist_checkpointing starts; those must not die of them.


def _start_writer_processes_shielded() -> None:
    """Start dist_checkpointing's long-lived results-queue manager with the stop signals blocked.

    The manager process is spawned once and reused by every later save. Started with the
    default dispositions it dies of the first SIGUSR1 srun forwards, and the next save fails
    with a BrokenPipeError. A blocked mask is inherited through fork and exec, so the manager
    never sees these signals, and blocking (unlike ignoring) loses none for the trainer: they
    stay pending and arrive as soon as the mask is restored.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _save_state(root: Union[str, Path], iteration: int, state: Dict[str, Any], metadata: Dict[str, Any],
                update_latest: bool = True) -> Path:
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if _rank() == 0:
        stale = path / METADATA_FILE
        if stale.exists():
            stale.unlink()  # re-saving an iteration: incomplete until the new metadata lands
        elif path.exists():
            shutil.rmtree(path)  # leftovers of a crashed save: start clean
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    _start_writer_processes_shielded()
    dist_checkpointing.save(state, str(path))
    _barrier()
    _maybe_crash_for_test()
    if _rank() == 0:
        meta = dict(metadata, format=FORMAT, iteration=iteration)
        meta.setdefault("layout", layout_signature())
        tmp = path / f".{METADATA_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=_json_default))
        os.replace(tmp, path / METADATA_FILE)
        if update_latest:
            write_latest(root, iteration)
    _barrier()
    return path


def resolve_iteration(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> int:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if iteration in (None, "latest"):
        latest = root / LATEST_FILE
        if not latest.is_file():
            if (root / METADATA_FILE).is_file():  # pointed at an iteration directory itself
                return int(json.loads((root / METADATA_FILE).read_text())["iteration"])
            raise CheckpointError(f"{root}: not a megafox checkpoint directory (no '{LATEST_FILE}' file)")
        try:
            return int(latest.read_text().strip())
        except ValueError:
            raise CheckpointError(f"{latest}: does not hold an iteration number") from None
    return int(iteration)


def checkpoint_path(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> Path:
    """The iteration directory for `root` (a checkpoint root or an iteration directory)."""
    root = Path(root)
    if (root / METADATA_FILE).is_file() and not (root / LATEST_FILE).is_file() and iteration in (None, "latest"):
        return root
    path = iteration_dir(root, resolve_iteration(root, iteration))
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{path}: incomplete or not a megafox checkpoint (no {METADATA_FILE})")
    return path


def read_metadata(root: Union[str, Path], iteration: Union[int, str, None] = "latest") -> Dict[str, Any]:
    path = checkpoint_path(root, iteration)
    meta = json.loads((path / METADATA_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    meta["path"] = str(path)
    return meta


def load_model(root: Union[str, Path], chunks: List[torch.nn.Module],
               iteration: Union[int, str, None] = "latest",
               extra_sharded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load model weights (any saved TP/PP layout) into `chunks`; return (metadata, loaded extras)."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(root, iteration)
    state = model_sharded_state_dict(chunks)
    if extra_sharded:
        state.update(extra_sharded)
    loaded = dist_checkpointing.load(state, meta["path"])
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=False)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
    meta["loaded"] = loaded
    return meta


# ----------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer + RNG + (in megafox.json) scheduler and data state.

# mcore 0.16 rejects flattened ShardedTensors, so `fully_sharded_model_space` cannot save;
# `fully_reshardable` (gathered over DP to per-parameter tensors) loads at any TP/PP/DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_saves_in_process = 0


def _maybe_crash_for_test() -> None:
    """MEGAFOX_TEST_CRASH_IN_SAVE=k: die in this process's k-th save, after the shards are
    written and before megafox.json, as a node failure would. Tests only."""
    global _saves_in_process
    _saves_in_process += 1
    target = os.environ.get("MEGAFOX_TEST_CRASH_IN_SAVE")
    if target and int(target) == _saves_in_process:
        print(f"[test hook] crashing in save #{_saves_in_process} before metadata", flush=True)
        os._exit(1)


def layout_signature() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "dp": ps.get_data_parallel_world_size(),
            "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}


def get_rng_state() -> Dict[str, Any]:
    import numpy as np
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: Any):
    """One object per (pp, tp, dp) rank: RNG streams only mean something on the same layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    lay = layout_signature()
    return ShardedObject("rng_state", state, (lay["pp"], lay["tp"], lay["dp"]),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def save_training_checkpoint(root: Union[str, Path], iteration: int, chunks: List[torch.nn.Module],
                             optimizer, metadata: Dict[str, Any], keep_last: Optional[int] = None) -> Path:
    """Everything needed to continue bit-exactly (same layout) or equivalently (any layout).

    `metadata` must be JSON-serializable and carries the scheduler and data state; its
    `stage_end: true` protects the checkpoint from rotation.
    """
    model_state = model_sharded_state_dict(chunks)
    with _optimizer_state_in_buffer_coordinates(optimizer):
        optimizer_state = optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA)
    extra = {"optimizer": optimizer_state, "rng_state": _rng_sharded(get_rng_state())}
    path = _save_state(root, iteration, dict(model_state, **extra), metadata)
    if keep_last is not None and _rank() == 0:
        rotate_checkpoints(root, keep_last)
    _barrier()
    return path


def load_training_checkpoint(root: Union[str, Path], chunks: List[torch.nn.Module], optimizer,
                             iteration: Union[int, str, None] = "latest", load_optimizer: bool = True) -> Dict[str, Any]:
    """Load model, optimizer and (when saved on this same layout) RNG states; return metadata.

    The optimizer loads at any TP/PP/DP layout; RNG streams are per-rank and restored only when
    the layout matches (the caller reseeds otherwise). `meta["rng_restored"]` says which.
    """
    from megatron.core import dist_checkpointing

    meta = read_metadata(root, iteration)
    state = model_sharded_state_dict(chunks)
    if load_optimizer:
        if "optimizer" not in _saved_top_keys(meta["path"]):
            raise CheckpointError(f"{meta['path']}: has no optimizer state (a model-only checkpoint); "
                                  "it can initialize weights but not resume training")
        _init_torch_adam_state(optimizer)
        with _optimizer_state_in_buffer_coordinates(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    same_layout = meta.get("layout") == layout_signature()
    if same_layout:
        state["rng_state"] = _rng_sharded(None)
    loaded = dist_checkpointing.load(state, meta["path"])
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)
    if load_optimizer:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    meta["rng_restored"] = same_layout
    return meta


@contextmanager
def _optimizer_state_in_buffer_coordinates(optimizer):
    """Work around a megatron-core 0.16 bug in the `fully_reshardable` save (its issue #504).

    `get_parameter_state_dp_zero` concatenates the DDP buckets of a buffer without the padding at
    the end of each bucket, but `sharded_param_state_fully_reshardable` cuts each parameter's
    state out of that at the parameter's position in the padded buffer. With more than one bucket
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


def _init_torch_adam_state(optimizer) -> None:
    """Give a fresh torch Adam (megatron-core's fallback without Apex/TE) a full state, 'step'
    included: the distributed optimizer's state_dict() asserts one common step and fails on an
    optimizer that has not stepped yet. The loaded checkpoint overwrites every value."""
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


def _load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """optimizer.load_state_dict, working around mcore 0.16 with torch Adam (no Apex/TE): the
    fully_reshardable loader copies every key of the live per-parameter state, 'step' included,
    from the checkpoint tensors that never hold 'step' (it lives in the param groups) -> KeyError.
    So load the param groups (and step) first, then the tensors with 'step' briefly set aside."""
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
    _unalias_adam_steps(optimizer)


def _unalias_adam_steps(optimizer) -> None:
    """mcore's loader gives every parameter the SAME 'step' tensor; torch Adam then adds 1 per
    parameter per step to it, corrupting bias correction (and rank-dependent: ranks hold
    different parameter counts). One tensor per parameter, as a fresh Adam has."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if isinstance(torch_opt, torch.optim.Optimizer):
            for st in torch_opt.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].detach().clone()


def _saved_top_keys(path: Union[str, Path]) -> set:
    from megatron.core import dist_checkpointing

    return {key.split(".")[0] for key in dist_checkpointing.load_tensors_metadata(str(path))}


def list_checkpoints(root: Union[str, Path]) -> List[int]:
    """Iterations with a complete checkpoint under `root`, oldest first."""
    root = Path(root)
    found = []
    for path in root.glob("iter_*"):
        if (path / METADATA_FILE).is_file():
            try:
                found.append(int(path.name[len("iter_"):]))
            except ValueError:
                continue
    return sorted(found)


def rotate_checkpoints(root: Union[str, Path], keep_last: int) -> List[int]:
    """Delete periodic checkpoints beyond the newest `keep_last`, and crash leftovers older than
    `latest`; keep `latest` and every stage end. Returns the deleted iterations."""
    root = Path(root)
    latest = resolve_iteration(root) if (root / LATEST_FILE).is_file() else None
    complete = list_checkpoints(root)
    keep = set(complete[-keep_last:])
    if latest is not None:
        keep.add(latest)
    deleted = []
    for it in complete:
        if it in keep:
            continue
        meta = json.loads((iteration_dir(root, it) / METADATA_FILE).read_text())
        if meta.get("stage_end"):
            continue
        # Metadata goes first: a half-deleted checkpoint then reads as incomplete, never as valid.
        (iteration_dir(root, it) / METADATA_FILE).unlink()
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
        deleted.append(it)
    for path in root.glob("iter_*"):
        try:
            it = int(path.name[len("iter_"):])
        except ValueError:
            continue
        if not (path / METADATA_FILE).is_file() and latest is not None and it < latest:
            shutil.rmtree(path, ignore_errors=True)
    return deleted


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")
