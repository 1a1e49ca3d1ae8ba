"""Typed configuration: model shape, parallel layout, and their presets.

Floor 1 of the package: imports nothing of ours, so every other floor (model, data, trainer,
tools) can depend on it. Everything is validated once, at start-up, with errors that name the
field (and the YAML file when it came from one) instead of failing deep inside megatron-core.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


# Every enumerated option is a Literal type; `check_types` validates all of them in one place
# (YAML, overrides and Python-built configs alike), so no lower layer re-checks them.
TransformerImpl = Literal["auto", "te", "local", "native"]
Precision = Literal["auto", "bf16", "fp32"]
Recompute = Literal["none", "selective", "full"]
LossKernel = Literal["eager", "compiled"]  # megafox.model.loss_kernels
LossGrad = Literal["precompute", "recompute"]  # megafox.model.fused_loss
ScheduleStyle = Literal["cosine", "wsd", "linear", "constant"]
WsdDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]
NanPolicy = Literal["skip", "halt"]
CheckpointFormat = Literal["sharded", "gathered"]  # megafox.checkpoint
StageKind = Literal["pretrain", "sft"]
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
    # Megatron-LM's --overlap-grad-reduce / --overlap-param-gather: the data-parallel gradient
    # reduce(-scatter) runs bucket by bucket during the backward, the distributed optimizer's
    # parameter all-gather during the next forward.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None  # parameters per bucket (megatron-core's default: max(40M, 1M x DP))
    # Megatron-LM's --distributed-timeout-minutes: how long a collective may wait for its peers
    # before the process group gives up (the watchdog below notices a hang much sooner)
    distributed_timeout_minutes: float = 30
    # every rank must have joined the rendezvous (MASTER_ADDR:MASTER_PORT) within this, else a
    # one-line error and exit 7 (retryable: the SLURM scripts requeue)
    rendezvous_timeout_seconds: float = 600

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
        check_types(self, "parallel")
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
        _require(not self.overlap_param_gather or (self.use_distributed_optimizer and self.overlap_grad_reduce),
                 "parallel.overlap_param_gather", "needs use_distributed_optimizer and overlap_grad_reduce")
        _require(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, "parallel.ddp_bucket_size",
                 f"must be >= 1, got {self.ddp_bucket_size}")
        for name in ("distributed_timeout_minutes", "rendezvous_timeout_seconds"):
            _require(getattr(self, name) > 0, f"parallel.{name}", f"must be > 0, got {getattr(self, name)}")
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


# ----------------------------------------------------------------------------------------------
# Training run: the curriculum (stages), optimizer, LR schedule, checkpoints, logging.
# One YAML file holds all of it (configs/train/*.yaml); `load_train_config` validates it once.

@dataclass
class StageConfig:
    """One curriculum stage: only data and sequence length change from the stage before.

    kind pretrain: `token_budget` tokens of the stage's blend. kind sft (supervised fine-tuning on
    chat data, packed conversations with a prompt-masked loss): `epochs` over the SFT blend; the
    stage's length comes from the data (its packed rows), capped by `token_budget` when given."""

    name: str
    seq_length: int
    batch_tokens: int  # global batch in tokens = global_batch_size x seq_length
    data: str  # blend.json from `make preprocess`; relative paths are under `data_dir`
    token_budget: Optional[int] = None  # tokens to train on in this stage (rounded down to whole batches)
    micro_batch_size: Optional[int] = None  # default: the run's micro_batch_size
    kind: StageKind = "pretrain"
    epochs: Optional[int] = None  # sft: passes over the conversations

    @property
    def global_batch_size(self) -> int:
        return self.batch_tokens // self.seq_length

    @property
    def num_steps(self) -> int:
        return self.token_budget // self.batch_tokens

    @property
    def trained_tokens(self) -> int:
        return self.num_steps * self.batch_tokens


@dataclass
class OptimizerConfig:
    """AdamW (megatron-core's optimizer; the distributed one when parallel says so)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0


@dataclass
class ScheduleConfig:
    """One LR schedule over the whole curriculum, counted in tokens, never reset at a stage.

    cosine/linear: warmup, then decay from lr to min_lr over the rest of the run.
    wsd: warmup, constant, then decay over the last `decay_tokens` tokens of the run.
    """

    style: ScheduleStyle = "cosine"
    warmup_tokens: int = 0
    decay_tokens: Optional[int] = None  # wsd only
    wsd_decay_style: WsdDecayStyle = "linear"
    init_lr: float = 0.0  # lr at token 0 (warmup starts here)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    # A finished run (e.g. the pretraining curriculum) whose `latest` weights start this one when
    # `dir` has no checkpoint yet: weights only; optimizer, LR schedule and data start fresh.
    init_from: Optional[str] = None
    interval: int = 1000  # steps between saves; every stage end is saved too
    keep_last: int = 2  # periodic checkpoints kept (stage-end ones are always kept)
    # sharded: each data-parallel rank writes (and on resume reads) only the weights and optimizer
    # state it owns; gathered: megatron-core's fully_reshardable save (whole state gathered to every
    # rank first). Same tensors on disk: either loads the other, at any TP/PP/DP.
    format: CheckpointFormat = "sharded"
    async_save: bool = False  # write the shards in the background while training continues


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines
    tensorboard_dir: Optional[str] = None  # default <checkpoint.dir>/tensorboard; "" disables
    wandb_project: Optional[str] = None  # W&B when set and wandb is installed
    wandb_run_name: Optional[str] = None
    peak_flops: float = 989e12  # per device, for MFU (H100 dense bf16)
    # Where the metrics go besides the log line and metrics/<stage>.jsonl (docs/observability.md).
    # null: tensorboard (unless tensorboard_dir is ""), plus wandb when wandb_project is set
    trackers: Optional[List[str]] = None
    wandb_dir: Optional[str] = None  # default <checkpoint.dir>; offline runs: WANDB_MODE=offline
    mlflow_tracking_uri: Optional[str] = None  # default file:<checkpoint.dir>/mlruns; or http://server:5000
    mlflow_experiment: Optional[str] = None  # default wandb_project, else "megafox"
    straggler_threshold: float = 1.2  # name the slowest rank when its busy time passes this x the median; 0 = off

    TRACKERS = ("tensorboard", "wandb", "mlflow")

    def active_trackers(self) -> List[str]:
        if self.trackers is not None:
            return list(self.trackers)
        return (["tensorboard"] if self.tensorboard_dir != "" else []) + (["wandb"] if self.wandb_project else [])


@dataclass
class ProfileConfig:
    """An on-demand torch.profiler trace (docs/observability.md)."""

    steps: List[int] = field(default_factory=list)  # [first, last] global iterations, inclusive; [] = off
    ranks: List[int] = field(default_factory=lambda: [0])  # global ranks that trace
    dir: Optional[str] = None  # default <checkpoint.dir>/profile
    signal_steps: int = 0  # > 0: a rank sent SIGUSR2 traces its next signal_steps steps (0: SIGUSR2 untouched)
    record_shapes: bool = False
    with_stack: bool = False
    memory_snapshot_on_oom: bool = True  # CUDA: write the allocator's snapshot when a step runs out of memory
    record_memory_history: bool = False  # CUDA: also record each allocation's stack for that snapshot (slower)


@dataclass
class ValidationConfig:
    interval: int = 0  # steps between validation runs; 0 = off
    batches: int = 4  # global batches of the held-out split per validation
    valid_fraction: float = 0.01  # share of each dataset's documents held out


@dataclass
class DataConfig:
    cache_dir: Optional[str] = None  # megatron's sample-index cache; default <checkpoint.dir>/data_cache


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
        _require(self.fused_loss or self.loss_kernel == "eager", "build.loss_kernel",
                 f"{self.loss_kernel!r} applies to the fused loss only; set build.fused_loss: true")
        _require(self.loss_chunk_tokens >= 1, "build.loss_chunk_tokens", f"must be >= 1, got {self.loss_chunk_tokens}")
        return self


@dataclass
class EvalConfig:
    """Downstream scores while training runs (megafox.training.callbacks.downstream_eval)."""

    interval: int = 0  # steps between evaluations; 0 = off
    tasks: List[str] = field(default_factory=list)  # "name", "name:shots" or a task YAML path
    data_dir: Optional[str] = None  # root of the staged datasets; None = the HF datasets cache
    limit: Optional[int] = 500  # documents per task; None = the whole test split
    batch_size: int = 16  # sequences per forward pass, per model replica
    max_length: Optional[int] = None  # longest input in tokens; None = the model's max positions

    def validate(self) -> "EvalConfig":
        """Types and ranges; task names are parsed and their data checked at start-up, on rank 0."""
        check_types(self, "eval")
        _require(self.interval >= 0, "eval.interval", f"must be >= 0 (0 = off), got {self.interval}")
        _require(not self.interval or bool(self.tasks), "eval.tasks",
                 "must name at least one task when eval.interval is set")
        _require(self.limit is None or self.limit >= 1, "eval.limit",
                 f"must be >= 1 (or null for all documents), got {self.limit}")
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_length is None or self.max_length >= 2, "eval.max_length",
                 f"must be >= 2, got {self.max_length}")
        return self


@dataclass
class DebugConfig:
    log_samples: bool = False  # write every step's sample ids to <checkpoint.dir>/samples/


@dataclass
class WatchdogConfig:
    """Per-rank progress watchdog (megafox/watchdog.py, docs/resilience.md): a rank that makes no
    progress in a phase for longer than its limit, or a peer that stops sending heartbeats, ends
    the job with exit 6 after every rank has dumped its Python stacks. Seconds throughout."""

    enabled: bool = True
    startup_seconds: float = 3600  # rendezvous, data/index build, model build, resume
    # one training step (incl. the stop agreement and logging after it); None = derived from the
    # steps measured so far: max(step_min_seconds, step_factor x median step)
    step_seconds: Optional[float] = None
    step_min_seconds: float = 300
    step_factor: float = 10
    save_seconds: float = 1800  # one checkpoint save
    eval_seconds: float = 1800  # one in-loop validation or downstream evaluation
    heartbeat_seconds: float = 5  # how often each rank reports to the rendezvous store
    peer_timeout_seconds: float = 30  # a rank silent this long is dead, stopped or on a lost node

    def validate(self) -> "WatchdogConfig":
        for name in ("startup_seconds", "step_min_seconds", "step_factor", "save_seconds", "eval_seconds",
                     "heartbeat_seconds", "peer_timeout_seconds"):
            _require(getattr(self, name) > 0, f"watchdog.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(self.step_seconds is None or self.step_seconds > 0, "watchdog.step_seconds",
                 f"must be > 0 (or null: derived from measured steps), got {self.step_seconds}")
        _require(self.peer_timeout_seconds > self.heartbeat_seconds, "watchdog.peer_timeout_seconds",
                 f"must be longer than watchdog.heartbeat_seconds ({self.heartbeat_seconds})")
        return self


@dataclass
class TrainConfig:
    model: ModelConfig
    stages: list
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    data_dir: str = "data"
    micro_batch_size: int = 1
    seed: int = 1234  # the one seed of a run: initial weights, RNG streams and the sample order
    nan_policy: NanPolicy = "skip"  # skip the step, or halt (exit 3)
    source: str = ""  # the YAML file, for messages
    overrides: List[str] = field(default_factory=list)  # as given on the command line / environment

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"--stage: unknown stage {name!r}; the config has {', '.join(s.name for s in self.stages)}")

    def stage_index(self, name: str) -> int:
        return self.stages.index(self.stage(name))

    @property
    def total_tokens(self) -> int:
        return sum(s.trained_tokens for s in self.stages)

    def tokens_before(self, name: str) -> int:
        return sum(s.trained_tokens for s in self.stages[:self.stage_index(name)])

    def blend_path(self, stage: StageConfig) -> Path:
        path = Path(stage.data).expanduser()
        return path if path.is_absolute() else Path(self.data_dir).expanduser() / path

    def mbs(self, stage: StageConfig) -> int:
        return stage.micro_batch_size or self.micro_batch_size

    def validate(self) -> "TrainConfig":
        """The one validation pass of a run: every section's types, then the cross-field rules."""
        check_types(self, "")
        for name, cls in _TRAIN_SECTIONS.items():
            check_types(getattr(self, name), name)
        self.model.validate()
        self.parallel.validate(self.model)
        self.build.validate()
        self.eval.validate()
        self.watchdog.validate()
        _require(isinstance(self.stages, list) and len(self.stages) > 0, "stages", "must be a non-empty list")
        _require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        seen = set()
        for i, s in enumerate(self.stages):
            where = f"stages[{i}]"
            _require(isinstance(s, StageConfig), where, "must be a stage mapping")
            check_types(s, f"stages.{s.name}" if isinstance(s.name, str) and s.name else where)
            _require(isinstance(s.name, str) and s.name != "", f"{where}.name", "must be a non-empty string")
            _require(s.name not in seen, f"{where}.name", f"duplicate stage name {s.name!r}")
            seen.add(s.name)
            where = f"stages.{s.name}"
            for name in ("seq_length", "batch_tokens") + (("token_budget",) if s.kind == "pretrain" else ()):
                value = getattr(s, name)
                _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                         f"{where}.{name}", f"must be a positive integer, got {value!r}")
            validate_seq_length(s.seq_length, self.model, f"{where}.seq_length")
            _require(s.batch_tokens % s.seq_length == 0, f"{where}.batch_tokens",
                     f"{s.batch_tokens} is not a multiple of seq_length ({s.seq_length})")
            _require(s.token_budget is None or s.token_budget >= s.batch_tokens, f"{where}.token_budget",
                     f"{s.token_budget} is less than one batch ({s.batch_tokens} tokens)")
            if s.kind == "sft":
                _require(s.epochs is not None and s.epochs >= 1, f"{where}.epochs",
                         f"an sft stage needs epochs >= 1, got {s.epochs!r}")
            else:
                _require(s.epochs is None, f"{where}.epochs", "only sft stages count epochs; set token_budget")
            mbs = self.mbs(s)
            _require(mbs >= 1, f"{where}.micro_batch_size", f"must be >= 1, got {mbs}")
            _require(s.global_batch_size % mbs == 0, f"{where}.batch_tokens",
                     f"global batch of {s.global_batch_size} sequences is not a multiple of "
                     f"micro_batch_size ({mbs})")
            _require(isinstance(s.data, str) and s.data != "", f"{where}.data", "must be a path to a blend.json")
        kinds = {s.kind for s in self.stages}
        _require(kinds != {"pretrain", "sft"}, "stages",
                 "an sft stage has its own optimizer state and LR schedule: put it in a config of its own "
                 "whose checkpoint.init_from names the pretraining run (see configs/train/fox1_sft.yaml)")
        o = self.optimizer
        _require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
        _require(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(o, name) < 1, f"optimizer.{name}", f"must be in [0, 1), got {getattr(o, name)}")
        _require(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
        _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
        _require(o.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0 (0 = off), got {o.clip_grad}")
        sc = self.schedule
        _require(0 <= sc.init_lr <= o.lr, "schedule.init_lr", f"must be in [0, optimizer.lr], got {sc.init_lr}")
        if sc.style != "wsd":
            _require(sc.decay_tokens is None, "schedule.decay_tokens", f"only used by style wsd, not {sc.style}")
        if all(s.token_budget is not None for s in self.stages):
            self.validate_schedule()  # else once the data has given every stage its length
        c = self.checkpoint
        _require(bool(c.dir), "checkpoint.dir", "must be set")
        _require(c.interval >= 1, "checkpoint.interval", f"must be >= 1, got {c.interval}")
        _require(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
        _require(self.logging.interval >= 1, "logging.interval", f"must be >= 1, got {self.logging.interval}")
        _require(self.logging.peak_flops > 0, "logging.peak_flops", f"must be > 0, got {self.logging.peak_flops}")
        for i, name in enumerate(self.logging.trackers or []):
            _require(name in LoggingConfig.TRACKERS, f"logging.trackers[{i}]",
                     f"must be one of {', '.join(LoggingConfig.TRACKERS)}, got {name!r}")
        _require(self.logging.straggler_threshold == 0 or self.logging.straggler_threshold > 1,
                 "logging.straggler_threshold", f"must be > 1 (or 0 = off), got {self.logging.straggler_threshold}")
        p = self.profile
        _require(not p.steps or (len(p.steps) == 2 and 1 <= p.steps[0] <= p.steps[1]), "profile.steps",
                 f"must be [first, last] global iterations with 1 <= first <= last (or [] = off), got {p.steps}")
        _require(all(r >= 0 for r in p.ranks), "profile.ranks", f"must be global ranks >= 0, got {p.ranks}")
        _require(p.signal_steps >= 0, "profile.signal_steps", f"must be >= 0 (0 = off), got {p.signal_steps}")
        v = self.validation
        _require(v.interval >= 0, "validation.interval", f"must be >= 0, got {v.interval}")
        _require(v.batches >= 1, "validation.batches", f"must be >= 1, got {v.batches}")
        _require(0 <= v.valid_fraction < 1, "validation.valid_fraction", f"must be in [0, 1), got {v.valid_fraction}")
        _require(v.interval == 0 or v.valid_fraction > 0, "validation.valid_fraction",
                 "must be > 0 when validation.interval is set")
        return self

    def validate_schedule(self) -> "TrainConfig":
        """The schedule against the run's length (for sft stages: once their data gave it)."""
        sc, total = self.schedule, self.total_tokens
        _require(0 <= sc.warmup_tokens < total, "schedule.warmup_tokens",
                 f"must be in [0, total trained tokens = {total}), got {sc.warmup_tokens}")
        if sc.style == "wsd":
            _require(sc.decay_tokens is not None and 0 < sc.decay_tokens <= total - sc.warmup_tokens,
                     "schedule.decay_tokens", f"wsd needs 0 < decay_tokens <= total - warmup "
                     f"({total - sc.warmup_tokens}), got {sc.decay_tokens}")
        return self


_TRAIN_SECTIONS = {"parallel": ParallelConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
                   "checkpoint": CheckpointConfig, "logging": LoggingConfig, "validation": ValidationConfig,
                   "data": DataConfig, "build": BuildConfig, "eval": EvalConfig, "debug": DebugConfig,
                   "profile": ProfileConfig, "watchdog": WatchdogConfig}

# Keys that moved; an old YAML or override gets told where each one lives now.
_MOVED = {"precision": "build.precision", "recompute": "build.recompute", "fused_loss": "build.fused_loss",
          "loss_kernel": "build.loss_kernel", "compile_layers": "build.compile_layers",
          "data.seed": "seed (one seed seeds the weights, the RNG streams and the sample order)"}


def parse_override(text: str):
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 2 is an int and true a bool)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides) -> Dict[str, Any]:
    """Set `a.b.c=v` paths in the raw config; stages are addressed by name (or list index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
                if match:
                    idx = node.index(match[0])
                elif part.isdigit() and int(part) < len(node):
                    idx = int(part)
                else:
                    raise ConfigError(f"override {text!r}: no list entry named {part!r}")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i])} is not a section")
    return data


def check_types(obj, where: str):
    """Check (and convert) every field of dataclass `obj` against its annotation, naming the field.

    YAML reads `3e-4` as a string and `1e12` may arrive as a float; both are accepted where a
    number is meant (an integral float where an int is meant), but a value that is not a number at
    all, a non-boolean flag or a value outside a Literal's choices is reported here, by name.
    """
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        name = f"{where}.{f.name}" if where else f.name
        setattr(obj, f.name, _checked(getattr(obj, f.name), hints[f.name], name))
    return obj


def _checked(value, kind, name: str):
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        _require(value in choices, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if kind is bool:
        _require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
    elif kind is str:
        _require(isinstance(value, str), name, f"must be a string, got {value!r}")
    elif kind in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        ok = isinstance(number, (int, float)) and not isinstance(number, bool)
        if ok and kind is int:
            ok = float(number).is_integer()
            number = int(number) if ok else number
        _require(ok, name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        return float(number) if kind is float else number
    elif origin in (list, List):
        _require(isinstance(value, list), name, f"must be a list, got {value!r}")
        item = (typing.get_args(kind) or (Any,))[0]
        if item is not Any and not dataclasses.is_dataclass(item):
            return [_checked(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def train_config_from_dict(data: Dict[str, Any], source: str = "") -> TrainConfig:
    data = dict(data or {})
    if "model" not in data:
        raise ConfigError("model: missing (e.g. `model: {preset: fox1-1.6b}`)")
    if "stages" not in data:
        raise ConfigError("stages: missing (a list of {name, seq_length, token_budget, batch_tokens, data})")
    moved = [k for k in data if k in _MOVED] + [f"data.{k}" for k in (data.get("data") or {})
                                                if f"data.{k}" in _MOVED]
    if moved:
        raise ConfigError("; ".join(f"{k}: moved to {_MOVED[k]}" for k in moved))
    known = {f.name for f in fields(TrainConfig)} - {"source", "overrides"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs: Dict[str, Any] = {"model": model_from_dict(data.pop("model"), "model")}
    stages = data.pop("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages: must be a non-empty list")
    kwargs["stages"] = []
    for i, s in enumerate(stages):
        where = f"stages.{s['name']}" if isinstance(s, dict) and isinstance(s.get("name"), str) else f"stages[{i}]"
        kwargs["stages"].append(from_dict(StageConfig, s, where))
    for name, cls in _TRAIN_SECTIONS.items():
        if name in data:
            kwargs[name] = from_dict(cls, data.pop(name), name)
    kwargs.update(data)
    return TrainConfig(source=source, **kwargs)


def load_train_config(path: str | Path, overrides=()) -> TrainConfig:
    """Read, override and validate a training config; every error names the file and field."""
    data = load_yaml(path)
    try:
        apply_overrides(data, overrides)
        config = train_config_from_dict(data, str(path))
        config.overrides = list(overrides)
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:  # e.g. a string where a number belongs
        raise ConfigError(f"{path}: {exc}") from None
