"""The training loop for one curriculum stage.

    setup: process groups -> data -> model/DDP/optimizer/schedule (stack.py) -> resume (curriculum.py)
    run:   for each global batch: forward/backward/step, update the run state, callbacks
           (metrics, validation, when to save, ...), agree on stop requests
           -> at the stage budget: final save, <stage>.done

Everything around the steps lives in callbacks (megafox.training.callbacks); the stage/resume
rules in curriculum.py; how a save is made in checkpoints.py (the callbacks decide when);
records on disk in megafox.records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from megafox.checkpoint.errors import CheckpointError
from megafox.checkpoint.layout import resolve_iteration
from megafox.checkpoint.run_lock import lock_for_run
from megafox.config import ConfigError, TrainConfig
from megafox.parallel.process_groups import init_distributed
from megafox.records import RunState
from megafox.runtime.dist import is_rank0
from megafox.runtime.process import EXIT_OK, EXIT_REQUEUE
from megafox.training import curriculum
from megafox.training.callbacks.base import Callback
from megafox.training.callbacks.checkpointing import CheckpointCallback
from megafox.training.callbacks.metrics import Metrics
from megafox.training.callbacks.profiler import ProfilerCallback
from megafox.training.callbacks.sample_log import SampleLogCallback
from megafox.training.callbacks.stop import StopCallback
from megafox.training.callbacks.validation import ValidationCallback
from megafox.training.checkpoints import TrainerCheckpoints
from megafox.training.schedule import current_lr
from megafox.training.stack import build_training_stack
from megafox.training.stage_inputs import build_stage_data
from megafox.training.step import train_step
from megafox.training.timers import PhaseTimers
from megafox.watchdog import Watchdog, start_watchdog


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


def log(message: str) -> None:
    if is_rank0():
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
        self.checkpoints = TrainerCheckpoints()  # the save mechanism; CheckpointCallback decides when
        self.extra_callbacks = list(callbacks)
        self.callbacks: List[Callback] = [self.stop]
        self.timers = PhaseTimers()  # where each step's time goes (metrics, profiler ranges)
        self.watchdog: Optional[Watchdog] = None

    log = staticmethod(log)

    def call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.config
        self.stop.install()  # before the slow parts, so an early signal is not lost
        self.watchdog = start_watchdog(cfg)
        env = init_distributed(cfg.parallel, cfg.seed)
        if self.watchdog is not None and env.world_size > 1:
            self.watchdog.connect(env.master_addr, env.master_port,
                                  min(cfg.watchdog.peer_timeout_seconds / 2, 2 * cfg.watchdog.heartbeat_seconds))
        self.lock = lock_for_run(self.root)  # released when the process ends, however it ends
        self.data = build_stage_data(cfg, self.stage, self.stage_index, log)
        self.tokenizer = self.data.tokenizer
        stack = build_training_stack(cfg.model, cfg.parallel, cfg.build, cfg.optimizer, run=cfg)
        self.model, self.optimizer, self.scheduler = stack.model, stack.optimizer, stack.scheduler
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.gbs, self.mbs = self.stage.global_batch_size, cfg.mbs(self.stage)
        # what the pipeline schedule sees of a micro-batch: packed SFT rows run as one long sequence
        self.schedule_shape = self.data.pipeline_shape(self.mbs)
        self.num_microbatches = self._num_microbatches(cfg.parallel.pp, cfg.parallel.vpp)
        self.is_sample_logger = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        curriculum.resume(self)
        self.metrics = Metrics(cfg, self.stage.name, cfg.model, self.stage.seq_length,
                               torch.distributed.get_world_size(), torch.distributed.get_rank())
        self.callbacks = [self.stop, self.metrics, ValidationCallback(), CheckpointCallback(),
                          *([SampleLogCallback()] if cfg.debug.log_samples else []),
                          *([self._downstream_eval()] if cfg.eval.interval else []), *self.extra_callbacks,
                          # last, so a traced step covers every other callback's work on it
                          *ProfilerCallback.for_rank(cfg, torch.distributed.get_rank())]
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

    @property
    def tokenizer_record(self) -> dict:
        return self.data.tokenizer_record()

    def optimizer_step(self) -> int:
        """Adam's step count (the same in every param group); 0 before the first step."""
        sd = self.optimizer.state_dict()
        groups = sd.get("optimizer", sd).get("param_groups", [])
        steps = [int(g["step"]) for g in groups if g.get("step") is not None]
        return max(steps) if steps else 0

    @property
    def lr(self) -> float:
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
            self.checkpoints.start(self)
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
                    self.checkpoints.save_unless_saved(self)
                log(f"stopping: {self.stop.describe(reason)}; "
                    + (f"checkpoint at iteration {self.state.iteration} saved" if ran else "no step ran, nothing to save")
                    + f"; exit {EXIT_REQUEUE} (requeue to continue)")
                return EXIT_REQUEUE
            if ran or not self.resumed_at_stage_end:  # else: died between the final save and .done
                self.checkpoints.save(self, stage_end=True)
            if is_rank0():
                curriculum.finish_stage(self.config, stage, self.state, self.data)
            self.call("on_stage_end")
            log(f"stage {stage.name} complete: iteration={self.state.iteration} loss={self.state.last_loss:.6f}")
            return EXIT_OK
        except BaseException as exc:
            self.call("on_error", exc)
            self.checkpoints.abandon(self)
            raise
        finally:
            self.call("close")

    def iterator(self, batches):
        """The schedule's data iterator: one per virtual pipeline chunk."""
        return [iter(batches) for _ in self.model] if len(self.model) > 1 else iter(batches)

    def step(self) -> StepReport:
        cfg, stage = self.config, self.stage
        if self.watchdog is not None:
            self.watchdog.step_begins(self.state.iteration + 1)
        with self.timers.phase("data"):
            batches = list(self.data.micro_batches(self.stage_samples, self.mbs, self.dp_rank, self.dp_size))
        if len(batches) != self.num_microbatches:
            raise RuntimeError(f"StageData gave {len(batches)} micro-batches, expected {self.num_microbatches}")
        self.call("pre_step", batches)
        # The lr of this step is the schedule at the tokens consumed once this batch is trained.
        self.scheduler.step(increment=stage.batch_tokens)
        lr = self.lr
        self.state.iteration += 1
        result = train_step(self.model, self.optimizer, self.iterator(batches), self.num_microbatches,
                            *self.schedule_shape, skip_nonfinite=True, timers=self.timers)
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
            return f"iteration {resolve_iteration(self.root)} in {self.root}"
        except CheckpointError:
            return f"none (nothing saved in {self.root} yet)"
