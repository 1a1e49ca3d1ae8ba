"""What a run reports: one log line per interval, TensorBoard scalars, W&B when configured, and
an exact per-step record (metrics/<stage>.jsonl) that tests and plots read.

Only global rank 0 writes; every value it reports is already global (the loss and grad norm are
reduced over all ranks by the step), so no extra communication happens here. Other callbacks
report through it (`validation`, `scalars`), so every number of a run lands in the same places.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any, Dict

import torch

from megafox.config import ModelConfig, TrainConfig
from megafox.info import flops_per_token
from megafox.training.callbacks.base import Callback


def memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Metrics(Callback):
    def __init__(self, config: TrainConfig, stage: str, model: ModelConfig, seq_length: int,
                 world_size: int, rank: int):
        self.rank, self.stage, self.world = rank, stage, world_size
        self.flops_per_token = flops_per_token(model, seq_length)
        self.peak = config.logging.peak_flops
        self.interval = config.logging.interval
        self._window_tokens, self._window_start = 0, time.monotonic()
        self._tb = self._wandb = self._jsonl = None
        if rank != 0:
            return
        root = Path(config.checkpoint.dir)
        (root / "metrics").mkdir(parents=True, exist_ok=True)
        self._jsonl = open(root / "metrics" / f"{stage}.jsonl", "a")
        tb_dir = config.logging.tensorboard_dir
        if tb_dir is None:
            tb_dir = str(root / "tensorboard")
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=tb_dir)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard scalars", flush=True)
        if config.logging.wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=config.logging.wandb_project,
                                         name=config.logging.wandb_run_name, resume="allow")
            except ImportError:
                print("logging.wandb_project is set but wandb is not installed: W&B logging off", flush=True)

    def post_step(self, trainer, report) -> None:
        self.step(report.iteration, {k: v for k, v in dataclasses.asdict(report).items() if k != "iteration"})

    def step(self, iteration: int, record: Dict[str, Any]) -> None:
        """Record one step; print the log line every `interval` steps."""
        self._window_tokens += record["batch_tokens"]
        if self.rank != 0:
            return
        self._jsonl.write(json.dumps(dict(record, iteration=iteration, stage=self.stage)) + "\n")
        self._jsonl.flush()
        for key in ("loss", "lr", "grad_norm"):
            self._scalar(f"train/{key}", record[key], record["consumed_tokens"])
        if iteration % self.interval != 0 and not record.get("skipped"):
            return
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12  # per device
        mfu = tflops * 1e12 / self.peak
        self._window_tokens, self._window_start = 0, now
        skipped = " skipped=1" if record.get("skipped") else ""
        print(f"step {iteration} stage={self.stage} tokens={record['consumed_tokens']} "
              f"loss={record['loss']:.6f} lr={record['lr']:.4e} grad_norm={record['grad_norm']:.4f} "
              f"tokens_per_s={tokens_per_s:.1f} tflops={tflops:.2f} mfu={100 * mfu:.2f}% "
              f"mem_gib={memory_gib():.2f}{skipped}", flush=True)
        self._scalar("perf/tokens_per_s", tokens_per_s, record["consumed_tokens"])
        self._scalar("perf/mfu", mfu, record["consumed_tokens"])

    def reset_window(self) -> None:
        """Leave checkpoint saves and validation out of the throughput figures."""
        self._window_tokens, self._window_start = 0, time.monotonic()

    def validation(self, iteration: int, consumed_tokens: int, loss: float) -> None:
        if self.rank != 0:
            return
        print(f"validation step={iteration} stage={self.stage} tokens={consumed_tokens} "
              f"valid_loss={loss:.6f}", flush=True)
        self._jsonl.write(json.dumps({"iteration": iteration, "stage": self.stage,
                                      "consumed_tokens": consumed_tokens, "valid_loss": loss}) + "\n")
        self._jsonl.flush()
        self._scalar("valid/loss", loss, consumed_tokens)

    def scalars(self, iteration: int, consumed_tokens: int, values: Dict[str, float]) -> None:
        """Other callbacks' numbers (e.g. downstream accuracy): a log line, TensorBoard and the jsonl."""
        if self.rank != 0:
            return
        shown = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"step {iteration} stage={self.stage} tokens={consumed_tokens} {shown}", flush=True)
        self._jsonl.write(json.dumps({"iteration": iteration, "stage": self.stage,
                                      "consumed_tokens": consumed_tokens, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._scalar(name, float(value), consumed_tokens)

    def _scalar(self, name: str, value: float, tokens: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(name, value, tokens)
        if self._wandb is not None:
            self._wandb.log({name: value, "tokens": tokens})

    def close(self, trainer=None) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
