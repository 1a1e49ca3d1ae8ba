"""What a run reports: one log line per interval, an exact per-step record (metrics/<stage>.jsonl)
that tests, plots and `megafox report` read, and the experiment trackers (TensorBoard, W&B,
MLflow: megafox.training.trackers) with the same values.

Only global rank 0 writes. The loss and grad norm are already global (the step reduces them);
the per-rank step times are gathered once per logging interval (one small all-gather) to name a
straggler. Other callbacks report through this one (`validation`, `scalars`), so every number of a
run lands in the same places.

A step's record holds its phase times (megafox.training.timers): the time since the previous
step's record, split into data wait, forward/backward, gradient reduction, optimizer, and whatever
ran after the previous step (checkpoint stall, validation, in-loop evaluation).
"""
from __future__ import annotations

import dataclasses
import json
import resource
import socket
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from megatron.core import parallel_state

from megafox.config import ModelConfig, TrainConfig
from megafox.info import flops_per_token
from megafox.training.callbacks.base import Callback
from megafox.training.trackers import check_available, open_trackers, tracker_values

# phases shown in the log line, in this order, with their short names
SHOWN = (("data", "data"), ("forward_backward", "fwd_bwd"), ("grad_reduce", "reduce"), ("optimizer", "opt"),
         ("checkpoint", "ckpt"), ("validation", "valid"), ("eval", "eval"))


def memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def slowest_rank(rows: List[List[float]], hosts: List[str], threshold: float) -> Dict[str, Any]:
    """Per rank [step, data, grad_reduce seconds, pipeline stage] -> the rank furthest above the
    median busy time (step - grad_reduce) of its pipeline stage: always its ratio, and its rank,
    host and data-wait share when the ratio reaches `threshold`."""
    busy = [step - reduce for step, _, reduce, _ in rows]
    ratios = []
    for rank, (_, _, _, stage) in enumerate(rows):
        median = statistics.median(b for b, row in zip(busy, rows) if row[3] == stage)
        ratios.append(busy[rank] / median if median > 0 else 1.0)
    slowest = max(range(len(rows)), key=lambda r: ratios[r])
    out: Dict[str, Any] = {"straggler_ratio": ratios[slowest]}
    if ratios[slowest] >= threshold:
        step, data = rows[slowest][:2]
        out.update(straggler_rank=slowest, straggler_host=hosts[slowest] if hosts else "",
                   straggler_data_share=data / step if step > 0 else 0.0)
    return out


class Metrics(Callback):
    def __init__(self, config: TrainConfig, stage: str, model: ModelConfig, seq_length: int,
                 world_size: int, rank: int):
        self.config, self.rank, self.stage, self.world = config, rank, stage, world_size
        self.flops_per_token = flops_per_token(model, seq_length)
        self.peak = config.logging.peak_flops
        self.interval = config.logging.interval
        self.threshold = config.logging.straggler_threshold
        self._window_tokens, self._window_start = 0, time.monotonic()
        self._window_time: Dict[str, float] = defaultdict(float)  # this rank's phase sums, for stragglers
        self._last_record: Optional[float] = None
        self.hosts: List[str] = []
        self.pp_rank = 0
        self.trackers: list = []
        self._jsonl = None
        check_available(config.logging.trackers or [])
        if rank != 0:
            return
        root = Path(config.checkpoint.dir)
        (root / "metrics").mkdir(parents=True, exist_ok=True)
        self._jsonl = open(root / "metrics" / f"{stage}.jsonl", "a")
        self.trackers, self.tracker_runs = open_trackers(config)

    def on_start(self, trainer) -> None:
        if parallel_state.model_parallel_is_initialized():
            self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        if self.world > 1 and self.threshold:
            self.hosts = [""] * self.world
            torch.distributed.all_gather_object(self.hosts, socket.gethostname())
        self._start_clock(trainer)

    def _start_clock(self, trainer) -> None:
        self.reset_window()  # throughput from the first step, not from set-up
        self._last_record = time.perf_counter()
        if getattr(trainer, "timers", None) is not None:
            trainer.timers.take()  # set-up and resume are not a step's time

    def post_step(self, trainer, report) -> None:
        record = {k: v for k, v in dataclasses.asdict(report).items() if k != "iteration"}
        timers = getattr(trainer, "timers", None)
        if timers is not None and self._last_record is not None:
            now = time.perf_counter()
            phases = timers.take()
            record["time/step"] = now - self._last_record
            record.update({f"time/{name}": seconds for name, seconds in phases.items()})
            self._last_record = now
        self.step(report.iteration, record, trainer)

    def step(self, iteration: int, record: Dict[str, Any], trainer=None) -> None:
        """Record one step; print the log line every `interval` steps."""
        self._window_tokens += record["batch_tokens"]
        for key, value in record.items():
            if key.startswith("time/"):
                self._window_time[key[5:]] += value
        self._window_time["steps"] += 1
        line_due = iteration % self.interval == 0
        straggler = self._gather_stragglers() if line_due else None
        if self.rank != 0:
            if line_due:
                self._reset_window_times()
            return
        if not (line_due or record.get("skipped")):
            self._emit(iteration, record)
            return
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12  # per device
        mfu = tflops * 1e12 / self.peak
        self._window_tokens, self._window_start = 0, now
        record.update(tokens_per_s=tokens_per_s, tflops=tflops, mfu=mfu, mem_gib=memory_gib())
        progress = self._progress(trainer, tokens_per_s) if trainer is not None else {}
        record.update(progress)
        if trainer is not None:
            record["skipped_steps"] = trainer.state.skipped_steps
        if straggler:
            record.update(straggler)
        if line_due:
            record.update(self._phase_means())
        skipped = " skipped=1" if record.get("skipped") else ""
        print(f"step {iteration} stage={self.stage} tokens={record['consumed_tokens']} "
              f"loss={record['loss']:.6f} lr={record['lr']:.4e} grad_norm={record['grad_norm']:.4f} "
              f"tokens_per_s={tokens_per_s:.1f} tflops={tflops:.2f} mfu={100 * mfu:.2f}% "
              f"mem_gib={record['mem_gib']:.2f}{skipped}{self._phases_text()}{self._progress_text(progress)}"
              f"{self._straggler_text(straggler)}", flush=True)
        self._emit(iteration, record)
        if line_due:
            self._reset_window_times()
        self._each_tracker("flush")

    # ---------------------------------------------------------------------------- pieces of a line
    def _emit(self, iteration: int, record: Dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(dict(record, iteration=iteration, stage=self.stage)) + "\n")
        self._jsonl.flush()
        # every step's own phase times stay in the jsonl; the trackers get the interval's means
        self._track({k: v for k, v in record.items() if not k.startswith("time/")}, iteration, record["consumed_tokens"])

    def _reset_window_times(self) -> None:
        self._window_time = defaultdict(float)

    def _phase_means(self) -> Dict[str, float]:
        """Mean seconds per step of each phase over the interval (what the trackers get: the
        jsonl has every step's own times, the trackers one point per interval)."""
        steps = self._window_time.get("steps", 0)
        return {f"time_mean/{name}": seconds / steps for name, seconds in self._window_time.items()
                if name != "steps" and steps}

    def _phases_text(self) -> str:
        means = self._phase_means()
        if "time_mean/step" not in means:
            return ""
        parts = [f"{short}={means[f'time_mean/{name}']:.3f}" for name, short in SHOWN if means.get(f"time_mean/{name}")]
        return f" step_s={means['time_mean/step']:.3f} [{' '.join(parts)}]"

    def _progress(self, trainer, tokens_per_s: float) -> Dict[str, float]:
        """Tokens done / budget of the stage, and the time to the end of the stage and of the
        curriculum at the recent throughput (later stages are assumed to run at it too)."""
        stage = trainer.stage
        try:
            budget = stage.num_steps * stage.batch_tokens
        except TypeError:  # an sft stage before its data gave its length
            return {}
        done = trainer.stage_samples * stage.seq_length
        later = 0
        for s in self.config.stages[trainer.stage_index + 1:]:
            if s.token_budget is None:
                break
            later += s.trained_tokens
        out = {"stage_tokens": done, "stage_progress": done / budget}
        if tokens_per_s > 0:
            out["eta_stage_s"] = max(budget - done, 0) / tokens_per_s
            out["eta_run_s"] = (max(budget - done, 0) + later) / tokens_per_s
        return out

    @staticmethod
    def _progress_text(progress: Dict[str, float]) -> str:
        if not progress:
            return ""
        text = f" stage_done={100 * progress['stage_progress']:.1f}%"
        if "eta_stage_s" in progress:
            text += f" eta_stage={duration(progress['eta_stage_s'])} eta_run={duration(progress['eta_run_s'])}"
        return text

    def _gather_stragglers(self) -> Optional[Dict[str, Any]]:
        """Every rank's step, data-wait and gradient-reduction seconds over the window; the slowest
        rank by busy time (its step time less the time it waited in the gradient reduction, where
        a fast rank waits for a slow one) when it passes `straggler_threshold` x the median of the
        ranks in its pipeline stage (stages differ by design: embedding, loss)."""
        if self.world <= 1 or not self.threshold:
            return None
        mine = torch.tensor([self._window_time.get("step", 0.0), self._window_time.get("data", 0.0),
                             self._window_time.get("grad_reduce", 0.0), self.pp_rank], dtype=torch.float64,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, mine)
        if self.rank != 0:
            return None
        return slowest_rank([t.tolist() for t in gathered], self.hosts, self.threshold)

    @staticmethod
    def _straggler_text(straggler: Optional[Dict[str, Any]]) -> str:
        if not straggler or "straggler_rank" not in straggler:
            return ""
        return (f" straggler=rank{straggler['straggler_rank']}@{straggler['straggler_host']} "
                f"({straggler['straggler_ratio']:.2f}x the median busy time, "
                f"{100 * straggler['straggler_data_share']:.0f}% of it data wait)")

    # -------------------------------------------------------------------------- other callbacks
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
        self._track({"valid_loss": loss}, iteration, consumed_tokens)

    def scalars(self, iteration: int, consumed_tokens: int, values: Dict[str, float]) -> None:
        """Other callbacks' numbers (e.g. downstream accuracy): a log line, the trackers and the jsonl."""
        if self.rank != 0:
            return
        shown = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"step {iteration} stage={self.stage} tokens={consumed_tokens} {shown}", flush=True)
        self._jsonl.write(json.dumps({"iteration": iteration, "stage": self.stage,
                                      "consumed_tokens": consumed_tokens, **values}) + "\n")
        self._jsonl.flush()
        self._track({k: v for k, v in values.items() if not isinstance(v, bool)}, iteration, consumed_tokens)

    def _track(self, record: Dict[str, Any], iteration: int, tokens: int) -> None:
        self._each_tracker("log", tracker_values(record), iteration, tokens)

    def _each_tracker(self, method: str, *args) -> None:
        """A tracker that fails (a tracking server gone, a full disk) is turned off with one line;
        the run, its log line and its jsonl go on."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001  (whatever the tracker's library raises)
                self.trackers.remove(tracker)
                print(f"{type(tracker).__name__}: {method} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                      "this tracker is off for the rest of this run", flush=True)

    def close(self, trainer=None) -> None:
        self._each_tracker("close")
        self.trackers = []
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
