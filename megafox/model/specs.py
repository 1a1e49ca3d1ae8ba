"""Layer-spec choice: which megatron-core modules make up one Fox-1 decoder layer.

te     megatron-core's Transformer Engine spec (fused kernels, FP8); only when TE is importable.
local  megatron-core's plain-PyTorch spec (the reference; materializes attention scores).
native local's spec with `SDPAttention` as core attention (flash/cuDNN through torch SDPA).
auto   te when Transformer Engine is installed, else native.

Packed sequences (SFT: several conversations per row, megatron's THD PackedSeqParams): te passes
them to Transformer Engine's attention, native attends per segment (`packed_attention` chooses the
kernel, see megafox.model.attention), local cannot - megatron-core's DotProductAttention asserts
deep inside the forward, so `require_packed_support` refuses it when the run is configured.
"""
from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megafox.config import ConfigError
from megafox.model.attention import PACKED_KERNELS, SDPAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "te" if transformer_engine_available() else "native"
    if impl == "te" and not transformer_engine_available():
        raise ConfigError("model.transformer_impl: 'te' needs Transformer Engine, which is not "
                          "installed here; use 'native' or 'local' (or 'auto')")
    return impl


def require_packed_support(impl: str) -> None:
    """ConfigError unless `impl` can attend over packed sequences (call it when a run trains on them)."""
    if resolve_impl(impl) == "local":
        raise ConfigError("model.transformer_impl: 'local' (megatron-core's DotProductAttention) cannot keep "
                          "packed conversations apart; SFT needs 'native' or 'te' (or 'auto')")


def layer_spec(impl: str, packed_attention: str = "segments") -> ModuleSpec:
    """`packed_attention`: the native spec's kernel for packed sequences (segments | mask | varlen)."""
    impl = resolve_impl(impl)
    if packed_attention not in PACKED_KERNELS:
        raise ConfigError(f"packed_attention: must be one of {', '.join(PACKED_KERNELS)}, got {packed_attention!r}")
    if impl == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    if impl == "native":
        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=SDPAttention, params={"packed_kernel": packed_attention})
    return spec
