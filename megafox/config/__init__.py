"""Typed configuration, floor 1 of the package: imports nothing of ours (and no torch), so every
other floor (model, data, trainer, tools, data_prep) can depend on it.

    loader.py     the generic loader: YAML, dotted key=value overrides, unknown-key rejection,
                  type checks from the dataclass annotations, errors naming the file and field
    model.py      ModelConfig + presets (fox1_1p6b(), fox1_tiny(), fox1_demo()), BuildConfig
    train.py      the training run: stages, parallel, optimizer, schedule, checkpoint, logging, ...
    eval.py       the `eval:` section (downstream scores while training)
    data_plan.py  the data plan (configs/data/*.yaml) that data_prep.plan runs

Everything is validated once, at start-up. The names below are the package's interface.
"""
from .data_plan import DataPlan, PlanSource, PlanStage, expand_vars, read_plan
from .eval import EvalConfig
from .loader import (CONFIG_WORDING, ConfigError, Wording, apply_overrides, check_keys, check_types, from_dict,
                     load_file, load_yaml, parse_override, require)
from .model import (DEFAULT_LOSS_CHUNK_TOKENS, LOSS_KERNELS, MODEL_PRESETS, TRANSFORMER_IMPLS, BuildConfig, LossGrad,
                    LossKernel, ModelConfig, PackedAttention, Precision, Recompute, TransformerImpl, fox1_1p6b,
                    fox1_demo, fox1_tiny, model_from_dict, model_preset, validate_seq_length)
from .train import (SECTIONS, CheckpointConfig, CheckpointFormat, DataConfig, DebugConfig, LoggingConfig, NanPolicy,
                    OptimizerConfig, ParallelConfig, ProfileConfig, ScheduleConfig, ScheduleStyle, StageConfig,
                    StageKind, TrainConfig, ValidationConfig, WatchdogConfig, WsdDecayStyle, load_train_config,
                    train_config_from_dict)
