"""The training loop for one curriculum stage.

    start -> build model/DDP/optimizer/schedule -> resume (own `latest`, else --load, else fresh)
          -> for each global batch: lr for this batch, forward/backward/step (step.py),
             agree on stop requests, log, validate, checkpoint
          -> at the stage budget: save, write <checkpoint.dir>/<stage>.done

Run state that survives restarts lives in the checkpoint's megafox.json: the global iteration,
tokens consumed over the whole run (= the LR scheduler's position), and consumed samples per
stage (the data position: StageData maps it to the same samples at any DP size).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megafox import checkpoint as ckpt
from megafox.config import ConfigError, StageConfig, TrainConfig
from megafox.training.signals import EXIT_OK, EXIT_REQUEUE, StopRequest


class TrainingHalted(RuntimeError):
    """Stopped by the NaN policy; exit status EXIT_NAN."""


@dataclass
class RunState:
    iteration: int = 0  # global steps over the whole run, skipped ones included
    consumed_tokens: int = 0  # over the whole run; equals the LR scheduler's position
    consumed_samples: Dict[str, int] = field(default_factory=dict)  # per stage
    skipped_steps: int = 0
    last_loss: float = float("nan")


def done_file(config: TrainConfig, stage: str) -> Path:
    return Path(config.checkpoint.dir) / f"{stage}.done"


def check_stage_order(config: TrainConfig, stage: str) -> Optional[str]:
    """Before any process group exists: None to train, or the reason this stage is complete.

    Raises ConfigError when an earlier stage has not finished: stage N starts from stage N-1's
    final checkpoint, so running them out of order would silently train on the wrong weights.
    """
    index = config.stage_index(stage)
    if done_file(config, stage).is_file():
        return f"stage {stage} already complete ({done_file(config, stage)})"
    for earlier in config.stages[:index]:
        if not done_file(config, earlier.name).is_file():
            raise ConfigError(f"--stage {stage}: stage {earlier.name} comes first and is not complete "
                              f"(no {done_file(config, earlier.name)}); run it first")
    return None


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def log(message: str) -> None:
    if _rank0():
        print(message, flush=True)


class Trainer:
    def __init__(self, config: TrainConfig, stage_name: str, load_dir: Optional[str] = None,
                 exit_after_minutes: Optional[float] = None):
        self.config = config
        self.stage: StageConfig = config.stage(stage_name)
        self.stage_index = config.stage_index(stage_name)
        self.load_dir = load_dir
        self.stop = StopRequest(exit_after_minutes)
        self.state = RunState()
        self.root = Path(config.checkpoint.dir)
        self.resumed_at_stage_end = False

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from megafox.model.build import BuildOptions, build_model, transformer_config
        from megafox.parallel import init_distributed
        from megafox.training.schedule import build_scheduler
        from megafox.training.step import build_optimizer, configure_schedule_hooks, wrap_ddp

        cfg = self.config
        self.stop.install()  # before the slow parts, so an early signal is not lost
        self.env = init_distributed(cfg.parallel, cfg.seed)
        self.on_gpu = torch.cuda.is_available()
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.on_gpu)
        self.data = self._build_data()
        options = BuildOptions(params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                               recompute=cfg.recompute, fused_loss=cfg.fused_loss, loss_kernel=cfg.loss_kernel,
                               compile_layers=cfg.compile_layers)
        chunks = build_model(cfg.model, cfg.parallel, options)
        tconfig = transformer_config(cfg.model, cfg.parallel, options)
        if bf16:
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(tconfig, c) for c in chunks]
        if self.on_gpu:
            chunks = [c.cuda() for c in chunks]
        self.ddp = wrap_ddp(chunks, tconfig, cfg.parallel)
        configure_schedule_hooks(self.ddp)
        self.optimizer = build_optimizer(self.ddp, cfg.optimizer, cfg.parallel, bf16=bf16)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.gbs, self.mbs = self.stage.global_batch_size, cfg.mbs(self.stage)
        if self.gbs % (self.mbs * self.dp_size) != 0:
            raise ConfigError(
                f"stages.{self.stage.name}.batch_tokens: global batch of {self.gbs} sequences is not "
                f"divisible by micro_batch_size x data-parallel size = {self.mbs} x {self.dp_size}")
        self.num_microbatches = self.gbs // (self.mbs * self.dp_size)
        pp, vpp = cfg.parallel.pp, cfg.parallel.vpp
        if vpp > 1 and self.num_microbatches % pp != 0:
            # megatron-core's interleaved schedule runs micro-batches in groups of pp per virtual stage
            raise ConfigError(
                f"stages.{self.stage.name}.batch_tokens: {self.num_microbatches} micro-batches per step "
                f"(global batch {self.gbs} / (micro_batch_size {self.mbs} x data-parallel {self.dp_size})) "
                f"must be a multiple of pipeline_model_parallel_size ({pp}) with virtual pipeline stages")
        self.is_sample_logger = (ps.get_tensor_model_parallel_rank() == 0
                                 and ps.get_pipeline_model_parallel_rank() == 0)
        self._resume()
        self.scheduler_check()

    def _build_data(self):
        from megafox.data.stage_data import StageData

        cfg, stage = self.config, self.stage
        blend = cfg.blend_path(stage)
        if not blend.is_file():
            raise ConfigError(f"stages.{stage.name}.data: {blend} not found (run `make preprocess` or set data_dir)")
        cache = cfg.data.cache_dir or str(self.root / "data_cache")
        previous = [self._previous_stage_spec(s) for s in cfg.stages[:self.stage_index]]
        data = StageData(str(blend), stage.seq_length, stage.global_batch_size, seed=cfg.data.seed,
                         cache_dir=cache, valid_fraction=cfg.validation.valid_fraction,
                         previous_stages=previous, token_budget=stage.token_budget)
        data.check_vocab(cfg.model.vocab_size)
        # special ids come from the tokenizer, never from presets (they end up in checkpoints/HF)
        cfg.model.eos_token_id = data.tokenizer.eos
        if data.tokenizer.bos is not None:
            cfg.model.bos_token_id = data.tokenizer.bos
        return data

    def _previous_stage_spec(self, stage: StageConfig) -> dict:
        """An earlier stage exactly as it was trained, so StageData can leave out what it read.
        The consumed samples come from its .done record (check_stage_order ensured it exists)."""
        record = json.loads(done_file(self.config, stage.name).read_text())
        return {"name": stage.name, "blend": str(self.config.blend_path(stage)), "seq_length": stage.seq_length,
                "token_budget": stage.token_budget, "consumed_samples": int(record["stage_samples"])}

    # --------------------------------------------------------------------------------- resume
    def _resume(self) -> None:
        own = (self.root / ckpt.LATEST_FILE).is_file()
        source = str(self.root) if own else self.load_dir
        if source is None:
            if self.stage_index > 0:
                raise ConfigError(f"--stage {self.stage.name}: no checkpoint in {self.root} to continue from "
                                  f"(stage {self.config.stages[self.stage_index - 1].name}'s final one)")
            log(f"starting stage {self.stage.name} from scratch (no checkpoint in {self.root})")
            return
        meta = ckpt.read_metadata(source)
        run = meta.get("run_state")
        if run is None:  # a model-only checkpoint, e.g. converted from HF: initial weights
            if self.stage_index > 0 and own:
                raise ConfigError(f"{meta['path']}: a model-only checkpoint cannot continue a curriculum")
            ckpt.load_model(source, self.ddp)
            # bf16 keeps fp32 main params in the optimizer: refresh them from the new weights
            self.optimizer.reload_model_params()
            log(f"initialized weights from {meta['path']} (model only; optimizer and data start fresh)")
            return
        saved_stage = meta["stage"]
        names = [s.name for s in self.config.stages]
        if saved_stage not in names:
            raise ConfigError(f"{meta['path']}: checkpoint is from stage {saved_stage!r}, which this config lacks")
        saved_index = names.index(saved_stage)
        if saved_index > self.stage_index:
            raise ConfigError(f"{meta['path']}: checkpoint is already in stage {saved_stage}; "
                              f"cannot go back to {self.stage.name}")
        if saved_index < self.stage_index and not (saved_index == self.stage_index - 1 and meta.get("stage_end")):
            raise ConfigError(f"{meta['path']}: checkpoint is inside stage {saved_stage}, not at the end of "
                              f"{names[self.stage_index - 1]}; finish that stage first")
        meta = ckpt.load_training_checkpoint(source, self.ddp, self.optimizer)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.state = RunState(iteration=meta["iteration"], consumed_tokens=run["consumed_tokens"],
                              consumed_samples=dict(run["consumed_samples"]),
                              skipped_steps=run.get("skipped_steps", 0), last_loss=run.get("last_loss", float("nan")))
        self.resumed_at_stage_end = bool(meta.get("stage_end")) and saved_stage == self.stage.name
        if not meta["rng_restored"]:
            log(f"layout changed ({meta['layout']} -> {ckpt.layout_signature()}): RNG states not restored (per-rank streams of another layout), left at the run's initial seeds")
        log(f"resumed from {meta['path']}: iteration={self.state.iteration} stage={saved_stage} "
            f"tokens={self.state.consumed_tokens} stage_samples={self.state.consumed_samples.get(self.stage.name, 0)} "
            f"optimizer_step={self.optimizer_step()} lr={self._lr():.6e}")

    def optimizer_step(self) -> int:
        """Adam's step count (the same in every param group); 0 before the first step."""
        sd = self.optimizer.state_dict()
        groups = sd.get("optimizer", sd).get("param_groups", [])
        steps = [int(g["step"]) for g in groups if g.get("step") is not None]
        return max(steps) if steps else 0

    def scheduler_check(self) -> None:
        if self.scheduler.num_steps != self.state.consumed_tokens:
            raise ckpt.CheckpointError(
                f"LR scheduler at {self.scheduler.num_steps} tokens but the run consumed "
                f"{self.state.consumed_tokens}: the checkpoint is inconsistent")

    def _lr(self) -> float:
        from megafox.training.schedule import current_lr

        return current_lr(self.scheduler)

    # ----------------------------------------------------------------------------------- loop
    @property
    def stage_samples(self) -> int:
        return self.state.consumed_samples.get(self.stage.name, 0)

    def run(self) -> int:
        from megafox.training.metrics import Metrics

        cfg, stage = self.config, self.stage
        target = stage.num_steps * self.gbs
        self.metrics = Metrics(cfg, stage.name, cfg.model, stage.seq_length,
                               torch.distributed.get_world_size(), torch.distributed.get_rank())
        log(f"stage {stage.name}: seq_length={stage.seq_length} global_batch={self.gbs} sequences "
            f"({stage.batch_tokens} tokens) micro_batch={self.mbs} x {self.num_microbatches} "
            f"dp={self.dp_size} steps={stage.num_steps} from sample {self.stage_samples}")
        last_saved = self.state.iteration if self.stage_samples else None
        ran = False
        try:
            while self.stage_samples < target:
                self._test_hooks_before_step()
                self._one_step()
                ran = True
                finished = self.stage_samples >= target
                reason = self.stop.agreed()
                if cfg.validation.interval and (self.state.iteration % cfg.validation.interval == 0 or finished):
                    self.validate()
                if finished:
                    break
                if reason:
                    if last_saved != self.state.iteration:
                        self.save(stage_end=False)
                    log(f"stopping: {StopRequest.describe(reason, self.stop.signal_name)}; checkpoint at "
                        f"iteration {self.state.iteration} saved; exit {EXIT_REQUEUE} (requeue to continue)")
                    return EXIT_REQUEUE
                if self.state.iteration % cfg.checkpoint.interval == 0:
                    self.save(stage_end=False)
                    last_saved = self.state.iteration
            if ran or not self.resumed_at_stage_end:  # else: died between the final save and .done
                self.save(stage_end=True)
            self._write_done()
            log(f"stage {stage.name} complete: iteration={self.state.iteration} loss={self.state.last_loss:.6f}")
            return EXIT_OK
        finally:
            self.metrics.close()

    def _micro_batches(self) -> List[Dict[str, torch.Tensor]]:
        batches = list(self.data.micro_batches(self.stage_samples, self.mbs, self.dp_rank, self.dp_size))
        if len(batches) != self.num_microbatches:
            raise RuntimeError(f"StageData gave {len(batches)} micro-batches, expected {self.num_microbatches}")
        if self.config.debug.log_samples and self.is_sample_logger:
            self._log_samples(batches)
        return batches

    def _one_step(self) -> None:
        from megafox.training.step import train_step

        cfg, stage = self.config, self.stage
        batches = self._micro_batches()
        iterator = [iter(batches) for _ in self.ddp] if len(self.ddp) > 1 else iter(batches)
        # The lr of this step is the schedule at the tokens consumed once this batch is trained.
        self.scheduler.step(increment=stage.batch_tokens)
        lr = self._lr()
        self.state.iteration += 1
        hook = self._nan_hook()
        try:
            result = train_step(self.ddp, self.optimizer, iterator, self.num_microbatches,
                                stage.seq_length, self.mbs, skip_nonfinite=True)
        finally:
            for h in hook:
                h.remove()
        self.state.consumed_samples[stage.name] = self.stage_samples + self.gbs
        self.state.consumed_tokens += stage.batch_tokens
        nonfinite = not (math.isfinite(result.loss) and math.isfinite(result.grad_norm))
        if result.skipped or nonfinite:
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
        self.metrics.step(self.state.iteration, {
            "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "batch_tokens": stage.batch_tokens,
            "consumed_tokens": self.state.consumed_tokens, "loss_tokens": result.num_tokens,
            "skipped": bool(result.skipped or nonfinite)})

    def validate(self) -> None:
        from megafox.training.step import train_step

        cfg = self.config
        total, tokens = 0.0, 0
        for b in range(cfg.validation.batches):
            batches = list(self.data.valid_micro_batches(b * self.gbs, self.mbs, self.dp_rank, self.dp_size))
            if not batches:
                break
            iterator = [iter(batches) for _ in self.ddp] if len(self.ddp) > 1 else iter(batches)
            for chunk in self.ddp:
                chunk.eval()
            try:
                with torch.no_grad():
                    result = train_step(self.ddp, self.optimizer, iterator, len(batches), self.stage.seq_length,
                                        self.mbs, forward_only=True)
            finally:
                for chunk in self.ddp:
                    chunk.train()
            total += result.loss * result.num_tokens
            tokens += result.num_tokens
        if tokens:
            self.metrics.validation(self.state.iteration, self.state.consumed_tokens, total / tokens)
        self.metrics.reset_window()

    # ----------------------------------------------------------------------------- checkpoint
    def save(self, stage_end: bool) -> None:
        t0 = time.monotonic()
        meta = {
            "kind": "megafox-train",
            "stage": self.stage.name, "stage_index": self.stage_index, "stage_end": stage_end,
            "seq_length": self.stage.seq_length, "global_batch_size": self.gbs,
            "scheduler": self.scheduler.state_dict(),
            "run_state": dataclasses.asdict(self.state),
            "model": dataclasses.asdict(self.config.model),
            "config": self.config.source,
            "tokenizer": self.data.tokenizer.info(),  # what megafox-to-hf ships with the weights
        }
        from megafox.training.step import params_gathered

        with params_gathered(self.ddp):  # overlap_param_gather leaves other ranks' shards stale
            path = ckpt.save_training_checkpoint(self.root, self.state.iteration, self.ddp, self.optimizer, meta,
                                                 keep_last=self.config.checkpoint.keep_last)
        log(f"saved checkpoint {path} (iteration {self.state.iteration}, {time.monotonic() - t0:.1f}s)")
        self.metrics.reset_window()

    def _write_done(self) -> None:
        if not _rank0():
            return
        record = {"stage": self.stage.name, "iteration": self.state.iteration,
                  "consumed_tokens": self.state.consumed_tokens,
                  "stage_samples": self.stage_samples, "loss": self.state.last_loss}
        path = done_file(self.config, self.stage.name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)

    def _latest_description(self) -> str:
        try:
            return f"iteration {ckpt.resolve_iteration(self.root)} in {self.root}"
        except ckpt.CheckpointError:
            return f"none (nothing saved in {self.root} yet)"

    # ------------------------------------------------------------------------------ debugging
    def _log_samples(self, batches) -> None:
        path = self.root / "samples" / f"{self.stage.name}.dp{self.dp_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = [int(i) for b in batches for i in b["sample_index"].view(-1).tolist()]
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": self.state.iteration + 1, "stage": self.stage.name,
                                "first_sample": self.stage_samples, "samples": ids}) + "\n")

    def _test_hooks_before_step(self) -> None:
        """Test-only fault injection, all through MEGAFOX_TEST_* variables (unset in real runs)."""
        next_iteration = self.state.iteration + 1
        if os.environ.get("MEGAFOX_TEST_KILL_AT_STEP") == str(next_iteration):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # as a node failure: no handler, no cleanup
        delay = os.environ.get("MEGAFOX_TEST_STEP_SLEEP")
        if delay:
            time.sleep(float(delay))

    def _nan_hook(self):
        """MEGAFOX_TEST_NAN_AT_STEP=k: make step k's loss NaN (from the last pipeline stage's
        per-token losses, so grads are NaN too)."""
        if os.environ.get("MEGAFOX_TEST_NAN_AT_STEP") != str(self.state.iteration):
            return []
        handles = []
        for chunk in self.ddp:
            model = ckpt.unwrap(chunk)
            if model.post_process:
                handles.append(model.register_forward_hook(lambda mod, args, out: out * float("nan")))
        return handles
