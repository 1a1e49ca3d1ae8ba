"""The model's schema: what the network is (ModelConfig), how it is built and computed
(BuildConfig), and the named presets (`fox1_1p6b()`, `fox1_tiny()`, `fox1_demo()`).

`model: {preset: fox1-1.6b, num_layers: 16}` in a training config is the preset with overrides.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Literal, Optional

from .loader import ConfigError, check_types, from_dict, require

# Every enumerated option is a Literal type; the loader's `check_types` validates all of them in one
# place (YAML, overrides and Python-built configs alike), so no lower layer re-checks them.
TransformerImpl = Literal["auto", "te", "local", "native"]
Precision = Literal["auto", "bf16", "fp32"]
Recompute = Literal["none", "selective", "full"]
LossKernel = Literal["eager", "compiled"]  # megafox.model.loss_kernels
LossGrad = Literal["precompute", "recompute"]  # megafox.model.fused_loss
PackedAttention = Literal["segments", "mask", "varlen"]  # megafox.model.attention (native spec)

TRANSFORMER_IMPLS = typing.get_args(TransformerImpl)
LOSS_KERNELS = typing.get_args(LossKernel)
# Tokens per chunk of the fused LM-head loss (megafox.model.fused_loss caps it by a logits budget).
DEFAULT_LOSS_CHUNK_TOKENS = 4096


@dataclass
class ModelConfig:
    """A Llama-family decoder (Fox-1 is one): RMSNorm, RoPE, SwiGLU, GQA, no biases."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads (GQA)
    vocab_size: int
    kv_channels: Optional[int] = None  # head dim; defaults to hidden / heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    init_std: float = 0.02
    # Megatron pads the embedding table so each TP shard is a multiple of this.
    make_vocab_size_divisible_by: int = 128
    transformer_impl: TransformerImpl = "auto"
    name: str = "custom"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def validate(self) -> "ModelConfig":
        check_types(self, "model")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            require(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.num_attention_heads % self.num_query_groups == 0, "model.num_query_groups",
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None:
            require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) unless kv_channels is set")
        require(self.head_dim % 2 == 0, "model.kv_channels", f"head dim must be even for RoPE, got {self.head_dim}")
        require(self.rope_theta > 0, "model.rope_theta", f"must be > 0, got {self.rope_theta}")
        require(self.norm_eps > 0, "model.norm_eps", f"must be > 0, got {self.norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            require(0 <= value < self.vocab_size, f"model.{name}",
                    f"must be in [0, vocab_size={self.vocab_size}), got {value}")
        return self


def validate_seq_length(seq_length: int, model: ModelConfig, where: str = "seq_length") -> None:
    require(seq_length > 0, where, f"must be > 0, got {seq_length}")
    require(seq_length <= model.max_position_embeddings, where,
            f"{seq_length} exceeds model.max_position_embeddings ({model.max_position_embeddings})")


@dataclass
class BuildConfig:
    """How the model is built and computed (not what it is): precision and the speed/memory
    trade-offs. The trainer, the benchmarks and the tests build through this one type."""

    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute: Recompute = "none"  # activation recomputation (megatron-core's granularities)
    fused_loss: bool = False  # chunked LM head + cross-entropy without full logits (megafox.model.fused_loss)
    loss_kernel: LossKernel = "eager"  # the fused loss's softmax/gradient: torch ops, or torch.compile'd
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    # precompute: LM-head gradients computed in the forward (needs the loss mask, which the
    # trainer passes); recompute: each chunk's logits recomputed in the backward
    loss_grad: LossGrad = "precompute"
    compile_layers: bool = False  # torch.compile each decoder layer (megafox.model.compile)
    # packed (SFT) sequences in the native spec: per-segment causal SDPA, one block-diagonal mask,
    # or flash varlen (CUDA, bf16/fp16 only)
    packed_attention: PackedAttention = "segments"

    def validate(self) -> "BuildConfig":
        check_types(self, "build")
        require(self.fused_loss or self.loss_kernel == "eager", "build.loss_kernel",
                f"{self.loss_kernel!r} applies to the fused loss only; set build.fused_loss: true")
        require(self.loss_chunk_tokens >= 1, "build.loss_chunk_tokens", f"must be >= 1, got {self.loss_chunk_tokens}")
        return self


# ----------------------------------------------------------------------------------------------
# Presets. fox1-1.6b is tensoropera/Fox-1-1.6B's config.json; the small ones keep its shape
# (deep and narrow, GQA 4:1, tied embeddings) at test size.

def fox1_1p6b() -> ModelConfig:
    return ModelConfig(
        name="fox1-1.6b", num_layers=32, hidden_size=2048, ffn_hidden_size=4096,
        num_attention_heads=16, num_query_groups=4, vocab_size=256000, rope_theta=10000.0,
        norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)


def fox1_tiny() -> ModelConfig:
    """Unit tests: 4 layers, hidden 64, GQA 4:2, vocab 1000 (padded to 1024)."""
    return ModelConfig(
        name="fox1-tiny", num_layers=4, hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, vocab_size=1000, max_position_embeddings=1024)


def fox1_demo() -> ModelConfig:
    """The CPU demo: deep-narrow like Fox-1 (8 layers, hidden 128, GQA 4:1 with 2 KV heads so
    TP2 splits it), a 4K vocab."""
    return ModelConfig(
        name="fox1-demo", num_layers=8, hidden_size=128, ffn_hidden_size=256,
        num_attention_heads=8, num_query_groups=2, vocab_size=4096,
        max_position_embeddings=1024)


MODEL_PRESETS: Dict[str, Callable[[], ModelConfig]] = {
    "fox1-1.6b": fox1_1p6b,
    "fox1-tiny": fox1_tiny,
    "fox1-demo": fox1_demo,
}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(MODEL_PRESETS)}") from None


def model_from_dict(data: Dict[str, Any], where: str = "model") -> ModelConfig:
    """`{preset: fox1-1.6b, num_layers: 16}` = the preset with overrides; no preset = all fields."""
    data = dict(data or {})
    preset = data.pop("preset", None)
    if preset is not None:
        base = dataclasses.asdict(model_preset(preset))
        unknown = sorted(set(data) - set(base))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        base.update(data)
        data = base
    return from_dict(ModelConfig, data, where).validate()

