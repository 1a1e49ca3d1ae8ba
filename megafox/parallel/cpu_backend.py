"""Lets megatron-core run on a CPU-only machine (gloo): CI, tests and the CPU demo.

megatron-core hard-codes CUDA in many places (`torch.cuda.current_device()`, `device="cuda"`
literals, the CUDA RNG tracker, `grad.type() == "torch.cuda.FloatTensor"` in grad clipping).
This module redirects those to the CPU. It is installed only when the process has no GPU
(`install_if_no_cuda`), so a GPU run never goes through it.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_mode = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device to torch


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _names_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if func is torch.Tensor.is_cuda.__get__:
            return True
        return func(*args, **kwargs)


def install() -> None:
    """Redirect CUDA to CPU for the rest of the process. Idempotent."""
    global _installed, _mode
    if _installed:
        return
    _installed = True
    cpu = torch.device("cpu")

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(state, device="cuda"):
        torch.set_rng_state(state)

    def manual_seed(seed):
        # not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. this function
        torch.default_generator.manual_seed(int(seed))

    patches = {
        "current_device": lambda: cpu,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "synchronize": lambda *a, **k: None,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 1,
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
    }
    for name, fn in patches.items():
        setattr(torch.cuda, name, fn)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        setattr(torch.cuda.random, name, patches[name])
    _mode = _CudaToCpu()
    _mode.__enter__()


def install_if_no_cuda() -> bool:
    """Install the shim when this process has no usable GPU; return whether it did."""
    if torch.cuda.is_available():
        return False
    install()
    return True
