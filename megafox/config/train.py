"""The training run's schema: the curriculum (stages), parallel layout, optimizer, LR schedule,
checkpoints, logging, validation, profiling and the watchdog. One YAML file holds all of it
(configs/train/*.yaml); `load_train_config` reads it through the generic loader and validates it once.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from .eval import EvalConfig
from .loader import ConfigError, check_types, from_dict, load_file, require
from .model import BuildConfig, ModelConfig, model_from_dict, validate_seq_length

ScheduleStyle = Literal["cosine", "wsd", "linear", "constant"]
WsdDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]
NanPolicy = Literal["skip", "halt"]
CheckpointFormat = Literal["sharded", "gathered"]  # megafox.checkpoint
StageKind = Literal["pretrain", "sft"]


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

    # megatron's short names
    tp = property(lambda self: self.tensor_model_parallel_size)
    pp = property(lambda self: self.pipeline_model_parallel_size)

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
        require(self.tp >= 1, "parallel.tensor_model_parallel_size", f"must be >= 1, got {self.tp}")
        require(self.pp >= 1, "parallel.pipeline_model_parallel_size", f"must be >= 1, got {self.pp}")
        if self.virtual_pipeline_model_parallel_size is not None:
            require(self.virtual_pipeline_model_parallel_size >= 1,
                    "parallel.virtual_pipeline_model_parallel_size",
                    f"must be >= 1, got {self.virtual_pipeline_model_parallel_size}")
            require(self.vpp == 1 or self.pp > 1, "parallel.virtual_pipeline_model_parallel_size",
                    "needs pipeline_model_parallel_size > 1")
        require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel",
                "needs tensor_model_parallel_size > 1")
        require(not self.overlap_param_gather or (self.use_distributed_optimizer and self.overlap_grad_reduce),
                "parallel.overlap_param_gather", "needs use_distributed_optimizer and overlap_grad_reduce")
        require(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, "parallel.ddp_bucket_size",
                f"must be >= 1, got {self.ddp_bucket_size}")
        for name in ("distributed_timeout_minutes", "rendezvous_timeout_seconds"):
            require(getattr(self, name) > 0, f"parallel.{name}", f"must be > 0, got {getattr(self, name)}")
        if model is not None:
            require(model.num_attention_heads % self.tp == 0, "parallel.tensor_model_parallel_size",
                    f"num_attention_heads ({model.num_attention_heads}) must be divisible by tp ({self.tp})")
            require(model.num_query_groups % self.tp == 0, "parallel.tensor_model_parallel_size",
                    f"num_query_groups / KV heads ({model.num_query_groups}) must be divisible by tp ({self.tp})")
            require(model.ffn_hidden_size % self.tp == 0, "parallel.tensor_model_parallel_size",
                    f"ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by tp ({self.tp})")
            stages = self.pp * self.vpp
            require(model.num_layers % stages == 0, "parallel.pipeline_model_parallel_size",
                    f"num_layers ({model.num_layers}) must be divisible by pipeline_model_parallel_size x "
                    f"virtual_pipeline_model_parallel_size ({self.pp} x {self.vpp})")
            require(model.padded_vocab_size(self.tp) % self.tp == 0, "model.make_vocab_size_divisible_by",
                    "padded vocab must split evenly across tp")
        if world_size is not None:
            self.data_parallel_size(world_size)
        return self


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
            require(getattr(self, name) > 0, f"watchdog.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.step_seconds is None or self.step_seconds > 0, "watchdog.step_seconds",
                f"must be > 0 (or null: derived from measured steps), got {self.step_seconds}")
        require(self.peer_timeout_seconds > self.heartbeat_seconds, "watchdog.peer_timeout_seconds",
                f"must be longer than watchdog.heartbeat_seconds ({self.heartbeat_seconds})")
        return self


@dataclass
class TrainConfig:
    """The whole run. Every field typed as a config dataclass (but `model`, which has presets) is a
    YAML section of the same name, read and checked by the generic loader (`SECTIONS`)."""

    # what is trained, on what, and how it is laid out and computed
    model: ModelConfig
    stages: list
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    data_dir: str = "data"
    micro_batch_size: int = 1
    seed: int = 1234  # the one seed of a run: initial weights, RNG streams and the sample order
    nan_policy: NanPolicy = "skip"  # skip the step, or halt (exit 3)
    # how it is optimized, saved, watched and measured
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
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
        for name, cls in SECTIONS.items():
            check_types(getattr(self, name), name)
        self.model.validate()
        self.parallel.validate(self.model)
        self.build.validate()
        self.eval.validate()
        self.watchdog.validate()
        require(isinstance(self.stages, list) and len(self.stages) > 0, "stages", "must be a non-empty list")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        seen = set()
        for i, s in enumerate(self.stages):
            where = f"stages[{i}]"
            require(isinstance(s, StageConfig), where, "must be a stage mapping")
            check_types(s, f"stages.{s.name}" if isinstance(s.name, str) and s.name else where)
            require(isinstance(s.name, str) and s.name != "", f"{where}.name", "must be a non-empty string")
            require(s.name not in seen, f"{where}.name", f"duplicate stage name {s.name!r}")
            seen.add(s.name)
            where = f"stages.{s.name}"
            for name in ("seq_length", "batch_tokens") + (("token_budget",) if s.kind == "pretrain" else ()):
                value = getattr(s, name)
                require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                        f"{where}.{name}", f"must be a positive integer, got {value!r}")
            validate_seq_length(s.seq_length, self.model, f"{where}.seq_length")
            require(s.batch_tokens % s.seq_length == 0, f"{where}.batch_tokens",
                    f"{s.batch_tokens} is not a multiple of seq_length ({s.seq_length})")
            require(s.token_budget is None or s.token_budget >= s.batch_tokens, f"{where}.token_budget",
                    f"{s.token_budget} is less than one batch ({s.batch_tokens} tokens)")
            if s.kind == "sft":
                require(s.epochs is not None and s.epochs >= 1, f"{where}.epochs",
                        f"an sft stage needs epochs >= 1, got {s.epochs!r}")
            else:
                require(s.epochs is None, f"{where}.epochs", "only sft stages count epochs; set token_budget")
            mbs = self.mbs(s)
            require(mbs >= 1, f"{where}.micro_batch_size", f"must be >= 1, got {mbs}")
            require(s.global_batch_size % mbs == 0, f"{where}.batch_tokens",
                    f"global batch of {s.global_batch_size} sequences is not a multiple of "
                    f"micro_batch_size ({mbs})")
            require(isinstance(s.data, str) and s.data != "", f"{where}.data", "must be a path to a blend.json")
        kinds = {s.kind for s in self.stages}
        require(kinds != {"pretrain", "sft"}, "stages",
                "an sft stage has its own optimizer state and LR schedule: put it in a config of its own "
                "whose checkpoint.init_from names the pretraining run (see configs/train/fox1_sft.yaml)")
        o = self.optimizer
        require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
        require(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(o, name) < 1, f"optimizer.{name}", f"must be in [0, 1), got {getattr(o, name)}")
        require(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
        require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
        require(o.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0 (0 = off), got {o.clip_grad}")
        sc = self.schedule
        require(0 <= sc.init_lr <= o.lr, "schedule.init_lr", f"must be in [0, optimizer.lr], got {sc.init_lr}")
        if sc.style != "wsd":
            require(sc.decay_tokens is None, "schedule.decay_tokens", f"only used by style wsd, not {sc.style}")
        if all(s.token_budget is not None for s in self.stages):
            self.validate_schedule()  # else once the data has given every stage its length
        c = self.checkpoint
        require(bool(c.dir), "checkpoint.dir", "must be set")
        require(c.interval >= 1, "checkpoint.interval", f"must be >= 1, got {c.interval}")
        require(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
        require(self.logging.interval >= 1, "logging.interval", f"must be >= 1, got {self.logging.interval}")
        require(self.logging.peak_flops > 0, "logging.peak_flops", f"must be > 0, got {self.logging.peak_flops}")
        for i, name in enumerate(self.logging.trackers or []):
            require(name in LoggingConfig.TRACKERS, f"logging.trackers[{i}]",
                    f"must be one of {', '.join(LoggingConfig.TRACKERS)}, got {name!r}")
        require(self.logging.straggler_threshold == 0 or self.logging.straggler_threshold > 1,
                "logging.straggler_threshold", f"must be > 1 (or 0 = off), got {self.logging.straggler_threshold}")
        p = self.profile
        require(not p.steps or (len(p.steps) == 2 and 1 <= p.steps[0] <= p.steps[1]), "profile.steps",
                f"must be [first, last] global iterations with 1 <= first <= last (or [] = off), got {p.steps}")
        require(all(r >= 0 for r in p.ranks), "profile.ranks", f"must be global ranks >= 0, got {p.ranks}")
        require(p.signal_steps >= 0, "profile.signal_steps", f"must be >= 0 (0 = off), got {p.signal_steps}")
        v = self.validation
        require(v.interval >= 0, "validation.interval", f"must be >= 0, got {v.interval}")
        require(v.batches >= 1, "validation.batches", f"must be >= 1, got {v.batches}")
        require(0 <= v.valid_fraction < 1, "validation.valid_fraction", f"must be in [0, 1), got {v.valid_fraction}")
        require(v.interval == 0 or v.valid_fraction > 0, "validation.valid_fraction",
                "must be > 0 when validation.interval is set")
        return self

    def validate_schedule(self) -> "TrainConfig":
        """The schedule against the run's length (for sft stages: once their data gave it)."""
        sc, total = self.schedule, self.total_tokens
        require(0 <= sc.warmup_tokens < total, "schedule.warmup_tokens",
                f"must be in [0, total trained tokens = {total}), got {sc.warmup_tokens}")
        if sc.style == "wsd":
            require(sc.decay_tokens is not None and 0 < sc.decay_tokens <= total - sc.warmup_tokens,
                    "schedule.decay_tokens", f"wsd needs 0 < decay_tokens <= total - warmup "
                    f"({total - sc.warmup_tokens}), got {sc.decay_tokens}")
        return self


SECTIONS = {name: kind for name, kind in typing.get_type_hints(TrainConfig).items()
            if dataclasses.is_dataclass(kind) and name != "model"}

# Keys that moved; an old YAML or override gets told where each one lives now.
_MOVED = {"precision": "build.precision", "recompute": "build.recompute", "fused_loss": "build.fused_loss",
          "loss_kernel": "build.loss_kernel", "compile_layers": "build.compile_layers",
          "data.seed": "seed (one seed seeds the weights, the RNG streams and the sample order)"}


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
    for name, cls in SECTIONS.items():
        if name in data:
            kwargs[name] = from_dict(cls, data.pop(name), name)
    kwargs.update(data)
    return TrainConfig(source=source, **kwargs)


def load_train_config(path: str | Path, overrides=()) -> TrainConfig:
    """Read, override and validate a training config; every error names the file and field."""
    def build(data: Dict[str, Any]) -> TrainConfig:
        config = train_config_from_dict(data, str(path))
        config.overrides = list(overrides)
        return config.validate()

    return load_file(path, build, overrides)
