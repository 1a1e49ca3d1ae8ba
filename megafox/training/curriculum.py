"""The curriculum's rules: stage order, the `.done` hand-over, and what a resume may continue from.

    stage N runs only after stages 1..N-1 wrote <checkpoint.dir>/<stage>.done (megafox.records);
    it starts from stage N-1's final checkpoint: weights, optimizer, LR schedule position and token
    count carry over, only the data and the sequence length change.

Resume source, in order: this run's own `latest`; else `--load DIR` (a pretraining run to continue
from, or a model-only checkpoint such as `megafox-from-hf`'s, which gives initial weights only);
else a fresh start (stage 1 only).

On resume the checkpoint's effective config (saved with every checkpoint, overrides applied) is
compared with the one given now. Differences that change the run (schedule, optimizer, batch,
layout...) are reported; the ones that make it wrong are refused unless `--allow-config-change`:
a different model shape, seed, held-out split, or the sequence length / token budget / data of a
stage already (partly) trained, which would change which samples were and will be read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megafox.checkpoint.errors import CheckpointError
from megafox.checkpoint.integrity import find_usable_checkpoint
from megafox.checkpoint.layout import LATEST_FILE
from megafox.checkpoint.loader import load_model, load_training_checkpoint
from megafox.checkpoint.state import layout_signature
from megafox.config import ConfigError, StageConfig, TrainConfig
from megafox.records import (CheckpointRecord, StageDone, config_mapping, done_path, flatten,
                             read_stage_done, same_value, write_stage_done)

# What fixes the shapes of the model's tensors: a checkpoint cannot continue into another value.
# (Other model fields, e.g. rope_theta or max_position_embeddings, change the run and are reported.)
_MODEL_SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "head_dim", "vocab_size", "tie_word_embeddings")
# Config fields that never matter to a resume (where things are written, how they are logged).
_IGNORED_PREFIXES = ("checkpoint.", "logging.", "debug.", "profile.", "data.cache_dir", "source", "overrides", "eval.",
                     # how long to wait for a hang: nothing the run computes (new keys of issue 23)
                     "watchdog.", "parallel.distributed_timeout_minutes", "parallel.rendezvous_timeout_seconds")


def check_stage_order(config: TrainConfig, stage: str) -> Optional[str]:
    """Before any process group exists: None to train, or the reason this stage is complete.

    Raises ConfigError when an earlier stage has not finished: stage N starts from stage N-1's
    final checkpoint, so running them out of order would silently train on the wrong weights.
    """
    root = config.checkpoint.dir
    index = config.stage_index(stage)
    if read_stage_done(root, stage) is not None:
        return f"stage {stage} already complete ({done_path(root, stage)})"
    for earlier in config.stages[:index]:
        if read_stage_done(root, earlier.name) is None:
            raise ConfigError(f"--stage {stage}: stage {earlier.name} comes first and is not complete "
                              f"(no {done_path(root, earlier.name)}); run it first")
    return None


def previous_stage_specs(config: TrainConfig, stage_index: int) -> List[Dict[str, Any]]:
    """The earlier stages exactly as they were trained, so the data can leave out what they read.
    Their consumed samples come from their .done records (check_stage_order ensured they exist)."""
    specs = []
    for stage in config.stages[:stage_index]:
        done = read_stage_done(config.checkpoint.dir, stage.name)
        specs.append({"name": stage.name, "blend": str(config.blend_path(stage)), "seq_length": stage.seq_length,
                      "token_budget": stage.token_budget, "consumed_samples": done.stage_samples})
    return specs


def finish_stage(config: TrainConfig, stage: StageConfig, state, data) -> None:
    """Rank 0, after the stage's final save: record the documents it read (with every earlier
    stage's; once, so later stages never recompute them), then its .done, which names the record."""
    documents = data.record_reads(config.checkpoint.dir, stage.name, state.consumed_samples.get(stage.name, 0))
    write_stage_done(config.checkpoint.dir, StageDone(
        stage=stage.name, iteration=state.iteration, consumed_tokens=state.consumed_tokens,
        stage_samples=state.consumed_samples.get(stage.name, 0), loss=state.last_loss, documents=documents))


# ----------------------------------------------------------------------------------------------
# what a checkpoint may be resumed into

def check_resumable_stage(record: CheckpointRecord, config: TrainConfig, stage_index: int) -> None:
    """A training checkpoint continues its own stage, or starts the next one from its stage end."""
    names = [s.name for s in config.stages]
    where = record.path
    if record.stage not in names:
        raise ConfigError(f"{where}: checkpoint is from stage {record.stage!r}, which this config lacks")
    saved_index = names.index(record.stage)
    if saved_index > stage_index:
        raise ConfigError(f"{where}: checkpoint is already in stage {record.stage}; cannot go back to "
                          f"{names[stage_index]}")
    if saved_index < stage_index and not (saved_index == stage_index - 1 and record.stage_end):
        raise ConfigError(f"{where}: checkpoint is inside stage {record.stage}, not at the end of "
                          f"{names[stage_index - 1]}; finish that stage first")


@dataclass
class ConfigChanges:
    refused: List[str] = field(default_factory=list)  # make the resumed run wrong
    reported: List[str] = field(default_factory=list)  # change the run; allowed, logged

    def describe(self, items: List[str]) -> str:
        return "; ".join(items)


def compare_configs(saved: Dict[str, Any], current: Dict[str, Any], trained_stages: List[str]) -> ConfigChanges:
    """Differences between the effective config saved with a checkpoint and the one given now.
    `trained_stages`: the stages the checkpoint has (partly) trained, whose data must not change."""
    old, new = flatten(saved), flatten(current)
    changes = ConfigChanges()
    for key in sorted(set(old) | set(new)):
        if key.startswith(_IGNORED_PREFIXES):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if same_value(a, b):
            continue
        text = f"{key}: {a!r} -> {b!r}"
        (changes.refused if _makes_it_wrong(key, trained_stages) else changes.reported).append(text)
    return changes


def _makes_it_wrong(key: str, trained_stages: List[str]) -> bool:
    if key.startswith("model."):
        name = key[len("model."):]
        return name in _MODEL_SHAPE or name == "kv_channels"
    if key in ("seed", "validation.valid_fraction"):
        return True  # the weights' init stream / the held-out documents, hence every sample order
    if key == "stages":
        return True  # stage names or order
    for stage in trained_stages:
        for name in ("seq_length", "token_budget", "data"):
            if key == f"stages.{stage}.{name}":
                return True  # its sample order, or the documents later stages must leave out
    return False


def check_model_shape(record: CheckpointRecord, config: TrainConfig) -> Tuple[str, ...]:
    """Differences in tensor shapes between a checkpoint's model and the config's (for records
    without a saved config: model-only and megafox-dist-v1 checkpoints)."""
    return tuple(f"model.{k}: {getattr(record.model, k)!r} -> {getattr(config.model, k)!r}" for k in _MODEL_SHAPE
                 if not same_value(getattr(record.model, k), getattr(config.model, k)))


# ----------------------------------------------------------------------------------------------
# resume

def resume(trainer) -> None:
    """Own `latest`, else --load, else checkpoint.init_from, else a fresh start."""
    own = (trainer.root / LATEST_FILE).is_file()
    source = str(trainer.root) if own else (trainer.load_dir or trainer.config.checkpoint.init_from)
    if source is None:
        if trainer.stage_index > 0:
            raise ConfigError(f"--stage {trainer.stage.name}: no checkpoint in {trainer.root} to continue from "
                              f"(stage {trainer.config.stages[trainer.stage_index - 1].name}'s final one)")
        trainer.log(f"starting stage {trainer.stage.name} from scratch (no checkpoint in {trainer.root})")
        return
    record = _usable_checkpoint(trainer, source)
    stages = [s.name for s in trainer.config.stages]
    if not record.is_training or (not own and (record.stage not in stages or not trainer.load_dir)):
        # model-only, checkpoint.init_from, or --load of another run's stage (e.g. SFT from a
        # pretraining run): its weights start this run; optimizer, schedule and data start fresh
        _start_from_weights(trainer, record, own)
        return
    check_resumable_stage(record, trainer.config, trainer.stage_index)
    _check_config(trainer, record)
    record, rng_restored = load_training_checkpoint(record.path, trainer.model, trainer.optimizer)
    trainer.scheduler.load_state_dict(record.scheduler)
    trainer.state = dataclasses.replace(record.run_state, consumed_samples=dict(record.run_state.consumed_samples))
    trainer.resumed_at_stage_end = record.stage_end and record.stage == trainer.stage.name
    if trainer.scheduler.num_steps != trainer.state.consumed_tokens:
        raise CheckpointError(f"{record.path}: LR scheduler at {trainer.scheduler.num_steps} tokens but "
                                         f"the run consumed {trainer.state.consumed_tokens}: the checkpoint is "
                                         f"inconsistent")
    if not rng_restored:
        trainer.log(f"layout changed ({record.layout} -> {layout_signature()}): RNG states not restored "
                    f"(per-rank streams of another layout), left at the run's initial seeds")
    trainer.log(f"resumed from {record.path}: iteration={trainer.state.iteration} stage={record.stage} "
                f"tokens={trainer.state.consumed_tokens} stage_samples={trainer.stage_samples} "
                f"optimizer_step={trainer.optimizer_step()} lr={trainer.lr:.6e}")


def _usable_checkpoint(trainer, source: str) -> CheckpointRecord:
    """The newest checkpoint of `source` that verifies (its files against the digests its save
    recorded); each newer one that does not is reported in one line and left on disk."""
    record, skipped = find_usable_checkpoint(source)
    for reason in skipped:
        trainer.log(f"skipping an unusable checkpoint: {reason}")
    if skipped:
        trainer.log(f"falling back to iteration {record.iteration} ({record.path}); the newer ones are kept for "
                    f"inspection")
    return record


def _start_from_weights(trainer, record: CheckpointRecord, own: bool) -> None:
    if trainer.stage_index > 0 and own:
        raise ConfigError(f"{record.path}: a model-only checkpoint cannot continue a curriculum")
    if trainer.stage_index > 0:
        raise ConfigError(f"{record.path}: initial weights start the first stage "
                          f"({trainer.config.stages[0].name}), not {trainer.stage.name}")
    shape = check_model_shape(record, trainer.config)
    if shape:
        raise ConfigError(f"{record.path}: the checkpoint's model differs from the config's: {'; '.join(shape)}")
    load_model(record.path, trainer.model)
    trainer.optimizer.reload_model_params()  # bf16 keeps fp32 main params in the optimizer: refresh them
    what = "model only" if not record.is_training else f"the weights of its stage {record.stage} checkpoint"
    trainer.log(f"initialized weights from {record.path} ({what}; optimizer, schedule and data start fresh)")


def _check_config(trainer, record: CheckpointRecord) -> None:
    if record.config is None:  # megafox-dist-v1: only the model can be checked
        changes = ConfigChanges(refused=list(check_model_shape(record, trainer.config)))
        trainer.log(f"{record.path}: saved before checkpoints recorded their config; only the model shape is checked")
    else:
        trained = [s.name for s in trainer.config.stages if s.name in record.run_state.consumed_samples]
        changes = compare_configs(record.config, config_mapping(trainer.config), trained)
    if changes.reported:
        trainer.log(f"config changed since {record.path}: {'; '.join(changes.reported)}")
    if changes.refused:
        what = "; ".join(changes.refused)
        if not trainer.allow_config_change:
            raise ConfigError(f"{record.path}: resuming with a config that changes what this run has trained "
                              f"would make it wrong: {what} (run with --allow-config-change to accept)")
        trainer.log(f"--allow-config-change: continuing despite: {what}")
