"""The training loop for one curriculum stage.

    setup: process groups -> data -> model/DDP/optimizer/schedule (stack.py) -> resume (curriculum.py)
    run:   for each global batch: forward/backward/step, update the run state, callbacks
           (metrics, validation, checkpoints, ...), agree on stop requests
           -> at the stage budget: final save, <stage>.done

Everything around the steps lives in callbacks (megafox.training.callbacks); the stage/resume
rules in curriculum.py; records on disk in megafox.records.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from megafox import checkpoint as ckpt
from megafox.config import ConfigError, TrainConfig
from megafox.records import RunState
from megafox.run_lock import lock_for_run
from megafox.signals import EXIT_OK, EXIT_REQUEUE
from megafox.training import curriculum
from megafox.training.callbacks.base import Callback
from megafox.training.callbacks.checkpointing import CheckpointCallback
from megafox.training.callbacks.sample_log import SampleLogCallback
from megafox.training.callbacks.stop import StopCallback
from megafox.training.callbacks.validation import ValidationCallback


class TrainingHalted(RuntimeError):
    """Stopped by the NaN policy; exit status EXIT_NAN."""


@dataclass
class StepReport:
    """One step as the callbacks (and metrics/<stage>.jsonl) see it."""

    iteration: int
    loss: float
    lr: float
    grad_norm: float
    batch_tokens: int
    consumed_tokens: int
    loss_tokens: int
    skipped: bool


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def log(message: str) -> None:
    if _rank0():
        print(message, flush=True)


class Trainer:
    def __init__(self, config: TrainConfig, stage_name: str, load_dir: Optional[str] = None,
                 exit_after_minutes: Optional[float] = None, callbacks: Sequence[Callback] = (),
                 allow_config_change: bool = False):
        self.config = config
        self.stage = config.stage(stage_name)
        self.stage_index = config.stage_index(stage_name)
        self.load_dir = load_dir
        self.allow_config_change = allow_config_change
        self.root = Path(config.checkpoint.dir)
        self.state = RunState()
        self.resumed_at_stage_end = False
        self.stop = StopCallback(exit_after_minutes)
        self.checkpointing = CheckpointCallback()
        self.extra_callbacks = list(callbacks)
        self.callbacks: List[Callback] = [self.stop]

    log = staticmethod(log)

    def call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from megafox.parallel import init_distributed
        from megafox.training.callbacks.metrics import Metrics
        from megafox.training.stack import build_training_stack

        cfg = self.config
        self.stop.install()  # before the slow parts, so an early signal is not lost
        init_distributed(cfg.parallel, cfg.seed)
        self.lock = lock_for_run(self.root)  # released when the process ends, however it ends
        self.data = self._build_data()
        self.tokenizer = self.data.tokenizer
        stack = build_training_stack(cfg.model, cfg.parallel, cfg.build, cfg.optimizer, run=cfg)
        self.model, self.optimizer, self.scheduler = stack.model, stack.optimizer, stack.scheduler
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.gbs, self.mbs = self.stage.global_batch_size, cfg.mbs(self.stage)
        # what the pipeline schedule sees of a micro-batch: packed SFT rows run as one long sequence
        self.schedule_shape = (self.data.pipeline_shape(self.mbs) if self.stage.kind == "sft"
                               else (self.stage.seq_length, self.mbs))
        self.num_microbatches = self._num_microbatches(cfg.parallel.pp, cfg.parallel.vpp)
        self.is_sample_logger = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        self.resume()
        self.metrics = Metrics(cfg, self.stage.name, cfg.model, self.stage.seq_length,
                               torch.distributed.get_world_size(), torch.distributed.get_rank())
        self.callbacks = [self.stop, self.metrics, ValidationCallback(), self.checkpointing,
                          *([SampleLogCallback()] if cfg.debug.log_samples else []),
                          *([self._downstream_eval()] if cfg.eval.interval else []), *self.extra_callbacks]

    def _downstream_eval(self):
        from megafox.training.callbacks.downstream_eval import DownstreamEvalCallback

        return DownstreamEvalCallback(self.config.eval)

    def _num_microbatches(self, pp: int, vpp: int) -> int:
        where = f"stages.{self.stage.name}.batch_tokens"
        if self.gbs % (self.mbs * self.dp_size) != 0:
            raise ConfigError(f"{where}: global batch of {self.gbs} sequences is not divisible by "
                              f"micro_batch_size x data-parallel size = {self.mbs} x {self.dp_size}")
        n = self.gbs // (self.mbs * self.dp_size)
        if vpp > 1 and n % pp != 0:
            # megatron-core's interleaved schedule runs micro-batches in groups of pp per virtual stage
            raise ConfigError(f"{where}: {n} micro-batches per step (global batch {self.gbs} / (micro_batch_size "
                              f"{self.mbs} x data-parallel {self.dp_size})) must be a multiple of "
                              f"pipeline_model_parallel_size ({pp}) with virtual pipeline stages")
        return n

    def _build_data(self):
        cfg, stage = self.config, self.stage
        blend = cfg.blend_path(stage)
        if not blend.is_file():
            raise ConfigError(f"stages.{stage.name}.data: {blend} not found (run `make preprocess` or set data_dir)")
        cache = cfg.data.cache_dir or str(self.root / "data_cache")
        if stage.kind == "sft":
            data = self._build_sft_data(blend, cache)
        else:
            data = self._build_stage_data()
        data.check_vocab(cfg.model.vocab_size)
        # special ids come from the tokenizer, never from presets (they end up in checkpoints/HF)
        cfg.model.eos_token_id = data.tokenizer.eos
        if data.tokenizer.bos is not None:
            cfg.model.bos_token_id = data.tokenizer.bos
        return data

    def _build_stage_data(self):
        """A pretraining stage's data, as `make data-index` builds it ahead (one definition). The
        documents earlier stages read come from the previous stage's record; a run that finished
        that stage before records existed recomputes them once and records them for its requeues."""
        from megafox.data.build_index import stage_data_from_config
        from megafox.data.documents_read import record_before, record_dir, save_document_set

        cfg, stage = self.config, self.stage
        excluded = record_before(cfg, self.stage_index)
        if excluded is not None:
            log(f"stage {stage.name}: leaving out the documents of {', '.join(e['stage'] for e in excluded.stages)}"
                f" ({sum(e.count for e in excluded.entries.values())} documents, recorded in {excluded.path})")
            return stage_data_from_config(cfg, stage.name, excluded_documents=excluded)
        data = stage_data_from_config(cfg, stage.name,
                                      previous_stages=curriculum.previous_stage_specs(cfg, self.stage_index))
        if self.stage_index > 0 and _rank0():
            before = cfg.stages[self.stage_index - 1]
            directory = record_dir(cfg.checkpoint.dir, before.name)
            save_document_set(data.excluded_documents, directory)
        return data

    def _build_sft_data(self, blend: Path, cache: str):
        """Packed chat conversations; the stage's length is the data's (its epochs of packed rows),
        capped by token_budget when the config sets one."""
        from megafox.data.sft_data import SFTData
        from megafox.model.specs import require_packed_support

        cfg, stage = self.config, self.stage
        require_packed_support(cfg.model.transformer_impl)
        data = SFTData(str(blend), stage.seq_length, stage.global_batch_size, seed=cfg.seed, epochs=stage.epochs,
                       valid_fraction=cfg.validation.valid_fraction, cache_dir=cache)
        available = data.num_samples * stage.seq_length
        stage.token_budget = min(stage.token_budget or available, available)
        cfg.validate_schedule()
        log(f"stage {stage.name}: {data.num_real_samples} packed rows of {stage.seq_length} tokens over {stage.epochs} "
            f"epoch(s), packing efficiency {100 * data.packing_efficiency:.1f}%: {stage.num_steps} steps")
        return data

    @property
    def tokenizer_record(self) -> dict:
        """What checkpoints record of the tokenizer (megafox-to-hf ships it), with the chat template
        of SFT data, so the exported tokenizer formats chats as the model was trained."""
        record = self.tokenizer.info()
        template = getattr(self.data, "chat_template", None)
        if template:
            record["chat_template"] = template
        return record

    def resume(self) -> None:
        """Own `latest`, else --load, else a fresh start (curriculum.py has the rules)."""
        own = (self.root / ckpt.LATEST_FILE).is_file()
        source = str(self.root) if own else (self.load_dir or self.config.checkpoint.init_from)
        if source is None:
            if self.stage_index > 0:
                raise ConfigError(f"--stage {self.stage.name}: no checkpoint in {self.root} to continue from "
                                  f"(stage {self.config.stages[self.stage_index - 1].name}'s final one)")
            log(f"starting stage {self.stage.name} from scratch (no checkpoint in {self.root})")
            return
        record = self._usable_checkpoint(source)
        stages = [s.name for s in self.config.stages]
        if not record.is_training or (not own and (record.stage not in stages or not self.load_dir)):
            # model-only, checkpoint.init_from, or --load of another run's stage (e.g. SFT from a
            # pretraining run): its weights start this run; optimizer, schedule and data start fresh
            self._start_from_weights(record, own)
            return
        curriculum.check_resumable_stage(record, self.config, self.stage_index)
        self._check_config(record)
        record, rng_restored = ckpt.load_training_checkpoint(record.path, self.model, self.optimizer)
        self.scheduler.load_state_dict(record.scheduler)
        self.state = dataclasses.replace(record.run_state, consumed_samples=dict(record.run_state.consumed_samples))
        self.resumed_at_stage_end = record.stage_end and record.stage == self.stage.name
        if self.scheduler.num_steps != self.state.consumed_tokens:
            raise ckpt.CheckpointError(f"{record.path}: LR scheduler at {self.scheduler.num_steps} tokens but the run "
                                       f"consumed {self.state.consumed_tokens}: the checkpoint is inconsistent")
        if not rng_restored:
            log(f"layout changed ({record.layout} -> {ckpt.layout_signature()}): RNG states not restored "
                f"(per-rank streams of another layout), left at the run's initial seeds")
        log(f"resumed from {record.path}: iteration={self.state.iteration} stage={record.stage} "
            f"tokens={self.state.consumed_tokens} stage_samples={self.stage_samples} "
            f"optimizer_step={self.optimizer_step()} lr={self.lr:.6e}")

    def _usable_checkpoint(self, source: str):
        """The newest checkpoint of `source` that verifies (its files against the digests its save
        recorded); each newer one that does not is reported in one line and left on disk."""
        if not (Path(source) / ckpt.LATEST_FILE).is_file() and (Path(source) / ckpt.METADATA_FILE).is_file():
            record = ckpt.read_record(source)  # pointed at one iteration directory: that one or nothing
            problem = ckpt.verify(Path(source), record.files)
            if problem:
                raise ckpt.NoUsableCheckpoint(f"{source}: not usable: {problem}")
            return record
        record, skipped = ckpt.find_usable_checkpoint(source)
        for reason in skipped:
            log(f"skipping an unusable checkpoint: {reason}")
        if skipped:
            log(f"falling back to iteration {record.iteration} ({record.path}); the newer ones are kept for inspection")
        return record

    def _start_from_weights(self, record, own: bool) -> None:
        if self.stage_index > 0 and own:
            raise ConfigError(f"{record.path}: a model-only checkpoint cannot continue a curriculum")
        if self.stage_index > 0:
            raise ConfigError(f"{record.path}: initial weights start the first stage "
                              f"({self.config.stages[0].name}), not {self.stage.name}")
        shape = curriculum.check_model_shape(record, self.config)
        if shape:
            raise ConfigError(f"{record.path}: the checkpoint's model differs from the config's: {'; '.join(shape)}")
        ckpt.load_model(record.path, self.model)
        self.optimizer.reload_model_params()  # bf16 keeps fp32 main params in the optimizer: refresh them
        what = "model only" if not record.is_training else f"the weights of its stage {record.stage} checkpoint"
        log(f"initialized weights from {record.path} ({what}; optimizer, schedule and data start fresh)")

    def _check_config(self, record) -> None:
        from megafox.records import config_mapping

        if record.config is None:  # megafox-dist-v1: only the model can be checked
            problems = list(curriculum.check_model_shape(record, self.config))
            changes = curriculum.ConfigChanges(refused=problems)
            log(f"{record.path}: saved before checkpoints recorded their config; only the model shape is checked")
        else:
            trained = [s.name for s in self.config.stages if s.name in record.run_state.consumed_samples]
            changes = curriculum.compare_configs(record.config, config_mapping(self.config), trained)
        if changes.reported:
            log(f"config changed since {record.path}: {'; '.join(changes.reported)}")
        if changes.refused:
            what = "; ".join(changes.refused)
            if not self.allow_config_change:
                raise ConfigError(f"{record.path}: resuming with a config that changes what this run has trained "
                                  f"would make it wrong: {what} (run with --allow-config-change to accept)")
            log(f"--allow-config-change: continuing despite: {what}")

    def optimizer_step(self) -> int:
        """Adam's step count (the same in every param group); 0 before the first step."""
        sd = self.optimizer.state_dict()
        groups = sd.get("optimizer", sd).get("param_groups", [])
        steps = [int(g["step"]) for g in groups if g.get("step") is not None]
        return max(steps) if steps else 0

    @property
    def lr(self) -> float:
        from megafox.training.schedule import current_lr

        return current_lr(self.scheduler)

    # ----------------------------------------------------------------------------------- loop
    @property
    def stage_samples(self) -> int:
        return self.state.consumed_samples.get(self.stage.name, 0)

    @property
    def stage_finished(self) -> bool:
        return self.stage_samples >= self.stage.num_steps * self.gbs

    def run(self) -> int:
        stage = self.stage
        log(f"stage {stage.name}: seq_length={stage.seq_length} global_batch={self.gbs} sequences "
            f"({stage.batch_tokens} tokens) micro_batch={self.mbs} x {self.num_microbatches} "
            f"dp={self.dp_size} steps={stage.num_steps} from sample {self.stage_samples}")
        try:
            self.call("on_start")
            reason = self.stop.agreed(signals_only=True)  # a signal held during start-up: no step at all
            ran = False
            while not self.stage_finished and not reason:
                report = self.step()
                ran = True
                self.call("post_step", report)
                reason = 0 if self.stage_finished else self.stop.agreed()
            if reason:
                if ran:
                    self.checkpointing.save_unless_saved(self)
                log(f"stopping: {self.stop.describe(reason)}; "
                    + (f"checkpoint at iteration {self.state.iteration} saved" if ran else "no step ran, nothing to save")
                    + f"; exit {EXIT_REQUEUE} (requeue to continue)")
                return EXIT_REQUEUE
            if ran or not self.resumed_at_stage_end:  # else: died between the final save and .done
                self.checkpointing.save(self, stage_end=True)
            if _rank0():
                curriculum.finish_stage(self.config, stage, self.state, self.data)
            self.call("on_stage_end")
            log(f"stage {stage.name} complete: iteration={self.state.iteration} loss={self.state.last_loss:.6f}")
            return EXIT_OK
        except BaseException as exc:
            self.call("on_error", exc)
            raise
        finally:
            self.call("close")

    def iterator(self, batches):
        """The schedule's data iterator: one per virtual pipeline chunk."""
        return [iter(batches) for _ in self.model] if len(self.model) > 1 else iter(batches)

    def step(self) -> StepReport:
        from megafox.training.step import train_step

        cfg, stage = self.config, self.stage
        batches = list(self.data.micro_batches(self.stage_samples, self.mbs, self.dp_rank, self.dp_size))
        if len(batches) != self.num_microbatches:
            raise RuntimeError(f"StageData gave {len(batches)} micro-batches, expected {self.num_microbatches}")
        self.call("pre_step", batches)
        # The lr of this step is the schedule at the tokens consumed once this batch is trained.
        self.scheduler.step(increment=stage.batch_tokens)
        lr = self.lr
        self.state.iteration += 1
        result = train_step(self.model, self.optimizer, self.iterator(batches), self.num_microbatches,
                            *self.schedule_shape, skip_nonfinite=True)
        self.state.consumed_samples[stage.name] = self.stage_samples + self.gbs
        self.state.consumed_tokens += stage.batch_tokens
        skipped = result.skipped or not (math.isfinite(result.loss) and math.isfinite(result.grad_norm))
        if skipped:
            what = f"loss={result.loss} grad_norm={result.grad_norm}"
            if cfg.nan_policy == "halt":
                raise TrainingHalted(
                    f"non-finite {what} at step {self.state.iteration} (stage {stage.name}); nan_policy is halt, "
                    f"so training stops without saving. The last checkpoint is "
                    f"{self._latest_description()}; inspect the data and the LR before resuming.")
            self.state.skipped_steps += 1
            log(f"skipped step {self.state.iteration}: {what} (nan_policy skip: weights unchanged, "
                f"batch dropped; {self.state.skipped_steps} skipped so far)")
        else:
            self.state.last_loss = result.loss
        return StepReport(self.state.iteration, result.loss, lr, result.grad_norm, stage.batch_tokens,
                          self.state.consumed_tokens, result.num_tokens, skipped)

    def _latest_description(self) -> str:
        try:
            return f"iteration {ckpt.resolve_iteration(self.root)} in {self.root}"
        except ckpt.CheckpointError:
            return f"none (nothing saved in {self.root} yet)"
