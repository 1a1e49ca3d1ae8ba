"""What observing a run costs per step: the trainer's steps with no tracker (the log line and
metrics/<stage>.jsonl only), each tracker alone (TensorBoard, W&B offline, MLflow file store) and
all three, in the same run, blocks of steps taking turns so drift and machine load fall on every
mode alike.

    python bench/observability.py [--steps 120 --block 10 --interval 10 --config configs/train/tiny.yaml]

One rank, in this process: the real Trainer (set-up, data, megatron-core step, callbacks) on the
tiny test data (tests/training/fixtures.py). Reported per mode: median step time (the time
between consecutive steps' records: the step and every callback) and the time spent in the
metrics callback itself (jsonl, log line, trackers; measured directly, so it does not drown in the
step's noise). The goal: trackers add <= 1% to a step. The step of a tiny CPU model (~tens of ms)
is the hardest case; a Fox-1 step on GPUs takes about a second (anchors.md: ~37K tokens/s/GPU at
seq 4K, 2M-token batch over 64 GPUs -> ~0.85 s), so the direct cost is also shown against that.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from megafox.config import load_train_config  # noqa: E402
from megafox.training.callbacks.metrics import Metrics  # noqa: E402
from megafox.training.loop import Trainer  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.training.fixtures import build_tiny_data  # noqa: E402

FOX1_STEP_S = 0.85


class TimedMetrics:
    """Wraps the trainer's Metrics callback: the seconds each post_step spends in it."""

    def __init__(self, inner: Metrics):
        self.inner, self.seconds = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def post_step(self, trainer, report) -> None:
        start = time.perf_counter()
        self.inner.post_step(trainer, report)
        self.seconds.append(time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="per mode")
    parser.add_argument("--block", type=int, default=10, help="steps per block; modes alternate by block")
    parser.add_argument("--interval", type=int, default=10, help="logging.interval")
    parser.add_argument("--config", default=str(REPO / "configs" / "train" / "tiny.yaml"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_observability_"))
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WANDB_MODE": "offline",
                       "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(work / "wandb_config"),
                       "WANDB_CACHE_DIR": str(work / "wandb_cache"), "WANDB_DATA_DIR": str(work / "wandb_data")})
    data = build_tiny_data(work / "data")
    total = 5 * args.steps + args.block
    config = load_train_config(args.config, [
        f"data_dir={data}", f"checkpoint.dir={work / 'run'}", "logging.trackers=[tensorboard,wandb,mlflow]",
        f"logging.interval={args.interval}", "checkpoint.interval=1000000", "validation.interval=0",
        "micro_batch_size=2", "stages.stage1.batch_tokens=512", f"stages.stage1.token_budget={512 * (total + 1)}",
        "schedule.style=cosine", "schedule.decay_tokens=null", "schedule.warmup_tokens=512"])
    trainer = Trainer(config, "stage1")
    trainer.setup()
    timed = TimedMetrics(trainer.metrics)
    trainer.callbacks = [timed if c is trainer.metrics else c for c in trainer.callbacks]
    trackers = trainer.metrics.trackers
    names = ["tensorboard", "wandb", "mlflow"]
    modes = {"off": [], **{name: [t] for name, t in zip(names, trackers)}, "all": trackers}
    trainer.call("on_start")
    steps = {mode: [] for mode in modes}
    callback = {mode: [] for mode in modes}
    for _ in range(args.block):  # warm-up, not counted
        trainer.call("post_step", trainer.step())
    block = 0
    while min(len(v) for v in steps.values()) < args.steps:
        mode = list(modes)[block % len(modes)]
        trainer.metrics.trackers = list(modes[mode])
        for _ in range(args.block):
            before = len(timed.seconds)
            trainer.call("post_step", trainer.step())
            callback[mode].append(timed.seconds[before])
        steps[mode].extend(_step_times(work / "run" / "metrics" / "stage1.jsonl", args.block))
        block += 1
    trainer.metrics.trackers = trackers
    trainer.call("close")
    off, cb_off = statistics.median(steps["off"]), statistics.mean(callback["off"])
    print(f"\n{args.steps} steps per mode, blocks of {args.block} in turn, logging.interval={args.interval}; "
          f"wandb offline, mlflow file store\n")
    print("| trackers | step time, median (ms) | vs off | metrics callback, mean (ms) | trackers' direct cost "
          f"(ms/step) | % of this step | % of a ~{FOX1_STEP_S} s Fox-1 step |\n|---|---|---|---|---|---|---|")
    for mode in modes:
        step, cb = statistics.median(steps[mode]), statistics.mean(callback[mode])
        extra = cb - cb_off
        print(f"| {mode} | {1e3 * step:.2f} | {step / off:.4f} | {1e3 * cb:.3f} | {1e3 * extra:.3f} | "
              f"{100 * extra / off:.2f}% | {100 * extra / FOX1_STEP_S:.3f}% |")
    return 0


def _step_times(path: Path, n: int):
    import json

    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["time/step"] for r in records if "time/step" in r][-n:]


if __name__ == "__main__":
    sys.exit(main())
