"""Typed configuration: model shape, parallel layout, and their presets.

Floor 1 of the package: imports nothing of ours, so every other floor (model, data, trainer,
tools) can depend on it. Everything is validated once, at start-up, with errors that name the
field (and the YAML file when it came from one) instead of failing deep inside megatron-core.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


TRANSFORMER_IMPLS = ("auto", "te", "local", "native")


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
    transformer_impl: str = "auto"  # auto | te | local | native
    name: str = "custom"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def validate(self) -> "ModelConfig":
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            _require(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(self.num_attention_heads % self.num_query_groups == 0, "model.num_query_groups",
                 f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                 f"num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None:
            _require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                     f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                     f"({self.num_attention_heads}) unless kv_channels is set")
        _require(self.head_dim % 2 == 0, "model.kv_channels", f"head dim must be even for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, "model.rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(self.norm_eps > 0, "model.norm_eps", f"must be > 0, got {self.norm_eps}")
        _require(self.transformer_impl in TRANSFORMER_IMPLS, "model.transformer_impl",
                 f"must be one of {', '.join(TRANSFORMER_IMPLS)}, got {self.transformer_impl!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            _require(0 <= value < self.vocab_size, f"model.{name}",
                     f"must be in [0, vocab_size={self.vocab_size}), got {value}")
        return self


@dataclass
class ParallelConfig:
    """The 3D layout. Data parallel size is whatever the world size leaves over."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp
        if world_size % model_parallel != 0:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by "
                f"tensor_model_parallel_size x pipeline_model_parallel_size = {self.tp} x {self.pp}")
        return world_size // model_parallel

    def validate(self, model: Optional[ModelConfig] = None, world_size: Optional[int] = None) -> "ParallelConfig":
        _require(self.tp >= 1, "parallel.tensor_model_parallel_size", f"must be >= 1, got {self.tp}")
        _require(self.pp >= 1, "parallel.pipeline_model_parallel_size", f"must be >= 1, got {self.pp}")
        if self.virtual_pipeline_model_parallel_size is not None:
            _require(self.virtual_pipeline_model_parallel_size >= 1,
                     "parallel.virtual_pipeline_model_parallel_size",
                     f"must be >= 1, got {self.virtual_pipeline_model_parallel_size}")
            _require(self.vpp == 1 or self.pp > 1, "parallel.virtual_pipeline_model_parallel_size",
                     "needs pipeline_model_parallel_size > 1")
        _require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel",
                 "needs tensor_model_parallel_size > 1")
        if model is not None:
            _require(model.num_attention_heads % self.tp == 0, "parallel.tensor_model_parallel_size",
                     f"num_attention_heads ({model.num_attention_heads}) must be divisible by tp ({self.tp})")
            _require(model.num_query_groups % self.tp == 0, "parallel.tensor_model_parallel_size",
                     f"num_query_groups / KV heads ({model.num_query_groups}) must be divisible by tp ({self.tp})")
            _require(model.ffn_hidden_size % self.tp == 0, "parallel.tensor_model_parallel_size",
                     f"ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by tp ({self.tp})")
            stages = self.pp * self.vpp
            _require(model.num_layers % stages == 0, "parallel.pipeline_model_parallel_size",
                     f"num_layers ({model.num_layers}) must be divisible by pipeline_model_parallel_size x "
                     f"virtual_pipeline_model_parallel_size ({self.pp} x {self.vpp})")
            _require(model.padded_vocab_size(self.tp) % self.tp == 0, "model.make_vocab_size_divisible_by",
                     "padded vocab must split evenly across tp")
        if world_size is not None:
            self.data_parallel_size(world_size)
        return self


def validate_seq_length(seq_length: int, model: ModelConfig, where: str = "seq_length") -> None:
    _require(seq_length > 0, where, f"must be > 0, got {seq_length}")
    _require(seq_length <= model.max_position_embeddings, where,
             f"{seq_length} exceeds model.max_position_embeddings ({model.max_position_embeddings})")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


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
    """The CPU demo: deep-narrow like Fox-1 (8 layers, hidden 128, GQA 4:1), a 4K vocab."""
    return ModelConfig(
        name="fox1-demo", num_layers=8, hidden_size=128, ffn_hidden_size=256,
        num_attention_heads=4, num_query_groups=1, kv_channels=32, vocab_size=4096,
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


# ----------------------------------------------------------------------------------------------
# YAML / dict loading shared by every config section.

def from_dict(cls, data: Dict[str, Any], where: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}: {exc}") from None


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


def load_yaml(path: str | Path) -> Dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data
