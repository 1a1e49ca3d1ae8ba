"""What a dead or hung rank costs, before and after the watchdog (megafox issue 23).

    python bench/resilience.py                      # all measurements (~4 min on 2 CPU cores)
    python bench/resilience.py --reduced --json o   # heartbeat costs + the extrapolation only (~10 s)

Measured here (CPU, gloo, launch/local.sh with 2 ranks of configs/train/tiny.yaml):

  dead rank      rank 1 SIGKILLed at the start of a step: fault -> the launcher has exited
  hung rank      rank 1 SIGSTOPped (a hung GPU, to its peers): fault -> the watchdog's line naming it
                 (detection) and -> the launcher has exited; with the default limits
                 (heartbeat 5 s, peer_timeout 30 s), and --reduced leaves it out
  restart        a rerun of the stopped stage: launch -> its first step after the resume
  heartbeat      per-step cost of the watchdog: its step hook (ns per call), rank 0's heartbeat
                 round trip reading W peers' beats from a real TCPStore (ms, W up to 512), and an
                 A/B of a compute-bound step loop with the watchdog thread beating every 0.2 s
                 against none (the thread's GIL share); the overhead per step is the cost per
                 heartbeat x steps per heartbeat / step time, goal <= 0.5%

The 512-GPU extrapolation (64 nodes x 8) prices an incident in GPU-hours: every GPU idles from the
fault until training is back at the step where it failed. Before = megafox before the watchdog:
a hung rank (and on NCCL a dead one) waits for the 30-minute process-group timeout, then exits 1,
which the SLURM scripts did not requeue, so a person had to resubmit (--person-hours, default 1 h);
a dead rank on gloo ended the job at once, but unrequeued too.
After = detection (peer_timeout or the step limit) + teardown + requeue + start-up + the steps
recomputed since the last checkpoint. Start-up and requeue times at that scale are inputs
(--startup-s, --requeue-s, --lost-steps-s), not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megafox.config import WatchdogConfig  # noqa: E402
from megafox.watchdog import Watchdog  # noqa: E402

SMALL = ["micro_batch_size=2", "stages.stage1.token_budget=16384", "stages.stage1.batch_tokens=512",
         "validation.interval=0", "logging.interval=1", "checkpoint.interval=4"]


# ----------------------------------------------------------------------------- heartbeat costs
def hook_ns(n: int = 200_000) -> float:
    dog = Watchdog(WatchdogConfig(), 0, 1, host="bench")
    t0 = time.perf_counter_ns()
    for i in range(n):
        dog.step_begins(i)
    return (time.perf_counter_ns() - t0) / n


def exchange_ms(world: int, rounds: int = 20) -> float:
    """Rank 0's heartbeat round trip with `world` ranks' beats in a real TCPStore."""
    from torch.distributed import TCPStore

    from megafox.runtime.dist import free_port

    port = free_port()
    server = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    for r in range(1, world):
        server.set(f"megafox/watchdog/hb/{r}", json.dumps({"n": 1, "host": f"n{r // 8}", "phase": "step",
                                                            "step": 1, "pid": r}))
    dog = Watchdog(WatchdogConfig(), 0, world, host="bench")
    dog.connect("127.0.0.1", port, 10.0)
    dog.exchange(time.monotonic())  # the first round also finds which keys exist
    t0 = time.perf_counter()
    for _ in range(rounds):
        dog.exchange(time.monotonic())
    ms = (time.perf_counter() - t0) / rounds * 1e3
    del server
    return ms


def loop_ab(seconds: float, heartbeat: float) -> dict:
    """A compute-bound step loop (torch matmuls, GIL released as in a real step) timed without and
    with a watchdog beating every `heartbeat` s to a real store; interleaved repeats."""
    import torch
    from torch.distributed import TCPStore

    from megafox.runtime.dist import free_port

    torch.set_num_threads(1)
    a = torch.randn(256, 256)

    def step():
        x = a
        for _ in range(20):
            x = torch.tanh(x @ a)
        return x

    def timed(n):
        t0 = time.perf_counter()
        for i in range(n):
            if dog_on[0] is not None:
                dog_on[0].step_begins(i)
            step()
        return (time.perf_counter() - t0) / n

    port = free_port()
    server = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    dog_on = [None]
    t0 = time.perf_counter()
    step()
    per = time.perf_counter() - t0
    n = max(20, int(seconds / 6 / max(per, 1e-4)))
    without, with_ = [], []
    for _ in range(3):
        dog_on[0] = None
        without.append(timed(n))
        dog = Watchdog(WatchdogConfig(heartbeat_seconds=heartbeat, peer_timeout_seconds=heartbeat * 10), 0, 1,
                       host="bench")
        dog.connect("127.0.0.1", port, 5.0)
        dog_on[0] = dog.start()
        with_.append(timed(n))
        dog.stop()
    del server
    return {"step_ms": min(without) * 1e3, "with_ms": min(with_) * 1e3, "heartbeat_s": heartbeat,
            "overhead_pct": (min(with_) / min(without) - 1) * 100}


# ---------------------------------------------------------------------------- incidents (local)
def _tiny_data(work: Path) -> Path:
    from tests.training.fixtures import build_tiny_data

    return build_tiny_data(work / "data")


def _launch(stage, ckpt, data, overrides, train_cmd=None):
    from megafox.runtime.dist import free_port

    env = dict(os.environ, MEGAFOX_CONFIG=str(REPO / "configs/train/tiny.yaml"), MEGAFOX_NPROC="2",
               MEGAFOX_MASTER_PORT=str(free_port()), MEGAFOX_PYTHON=sys.executable, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               MEGAFOX_OVERRIDES=" ".join([f"data_dir={data}", f"checkpoint.dir={ckpt}", *SMALL, *overrides]))
    if train_cmd:
        env["MEGAFOX_TRAIN_CMD"] = train_cmd
    return subprocess.Popen(["bash", str(REPO / "launch/local.sh"), stage], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _timeline(proc, patterns: dict, timeout: float) -> dict:
    """Seconds since launch at which each pattern first appeared, and 'exit'."""
    t0, seen, lines = time.monotonic(), {}, []

    def read():
        for line in proc.stdout:
            lines.append(line)
            for name, pat in patterns.items():
                if name not in seen and re.search(pat, line):
                    seen[name] = time.monotonic() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    seen["exit"] = time.monotonic() - t0
    reader.join(timeout=5)
    seen["rc"] = proc.returncode
    seen["tail"] = "".join(lines[-5:])
    return seen


def incident(kind: str, work: Path, data: Path, overrides) -> dict:
    ckpt = work / f"ckpt_{kind}"
    fault = {"dead": "--kill-at-step 6@1", "hung": "--stop-at-step 6@1"}[kind]
    cmd = f"{sys.executable} -m tests.support.faults {fault} --"
    t = _timeline(_launch("stage1", ckpt, data, overrides, cmd),
                  {"fault": r"\[test fault\]", "named": r"megafox watchdog: no heartbeat"}, 600)
    restart = _timeline(_launch("stage1", ckpt, data, overrides),
                        {"resumed": r"^resumed from", "first_step": r"^step \d+ stage=stage1"}, 600)
    out = {"rc": t["rc"], "fault_to_exit_s": t["exit"] - t.get("fault", float("nan")),
           "restart_to_first_step_s": restart.get("first_step", float("nan")), "restart_rc": restart["rc"]}
    if "named" in t:
        out["fault_to_named_s"] = t["named"] - t["fault"]
    return out


# ------------------------------------------------------------------------------- extrapolation
def extrapolate(args, measured: dict) -> list:
    gpus, person, pg = args.gpus, args.person_hours * 3600, 30 * 60
    cfg = WatchdogConfig()
    restart = args.requeue_s + args.startup_s + args.lost_steps_s
    rows = []
    for fault, before, after_detect in [
        ("dead rank, gloo", person + restart, 0.0),  # ended at once, but FAILED: not requeued
        ("dead rank, NCCL", pg + person + restart, cfg.peer_timeout_seconds),
        ("hung rank (stopped GPU)", pg + person + restart, cfg.peer_timeout_seconds),
        ("hung rank (stuck collective)", pg + person + restart, max(cfg.step_min_seconds,
                                                                     cfg.step_factor * args.step_s)),
        ("lost node", pg + person + restart, cfg.peer_timeout_seconds),
    ]:
        after = after_detect + args.teardown_s + restart
        rows.append({"fault": fault, "before_s": before, "after_s": after,
                     "before_gpu_h": before * gpus / 3600, "after_gpu_h": after * gpus / 3600})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="heartbeat costs and the extrapolation only")
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--gpus", type=int, default=512)
    p.add_argument("--step-s", type=float, default=12.0, help="Fox-1 step time at 512 GPUs (for the step limit)")
    p.add_argument("--startup-s", type=float, default=300.0, help="stage start-up at 512 GPUs, to the first step")
    p.add_argument("--requeue-s", type=float, default=120.0, help="requeue until the job runs again")
    p.add_argument("--teardown-s", type=float, default=30.0, help="the job's end after detection (srun --wait)")
    p.add_argument("--lost-steps-s", type=float, default=0.0,
                   help="steps recomputed since the last checkpoint (half the interval on average; "
                        "the same before and after, 0 leaves it out)")
    p.add_argument("--person-hours", type=float, default=1.0, help="before: until someone resubmits")
    args = p.parse_args(argv)

    result = {"hook_ns": hook_ns(), "exchange_ms": {w: exchange_ms(w) for w in (8, 64, 512)},
              "loop": loop_ab(4 if args.reduced else 20, 0.2)}
    step_s, hb = args.step_s, WatchdogConfig().heartbeat_seconds
    # per-step overhead at Fox-1's scale: rank 0's round trip (512 beats) once per heartbeat
    result["overhead_512_pct"] = (result["exchange_ms"][512] / 1e3 / hb
                                  + result["hook_ns"] / 1e9 / step_s) * 100
    if not args.reduced:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            data = _tiny_data(work)
            result["dead"] = incident("dead", work, data, [])
            result["hung"] = incident("hung", work, data, [])
    result["extrapolation"] = extrapolate(args, result)

    print("## heartbeat cost")
    print("| measure | value |\n| --- | --- |")
    print(f"| step hook (per step) | {result['hook_ns']:.0f} ns |")
    for w, ms in result["exchange_ms"].items():
        print(f"| rank 0 heartbeat round trip, {w} ranks | {ms:.2f} ms |")
    loop = result["loop"]
    print(f"| compute loop, {loop['step_ms']:.1f} ms steps, beat every {loop['heartbeat_s']} s "
          f"(25x the default rate) | {loop['overhead_pct']:+.2f}% (noise: +-1%) |")
    print(f"| per-step overhead at 512 ranks, default 5 s heartbeat, {step_s:.0f} s steps | "
          f"{result['overhead_512_pct']:.4f}% (goal <= 0.5%) |")
    for kind in ("dead", "hung"):
        if kind in result:
            r = result[kind]
            print(f"\n## {kind} rank (local.sh, 2 ranks, default limits): exit {r['rc']}")
            if "fault_to_named_s" in r:
                print(f"- fault -> named by the watchdog: {r['fault_to_named_s']:.1f} s")
            print(f"- fault -> job ended: {r['fault_to_exit_s']:.1f} s")
            print(f"- rerun -> first step after the resume: {r['restart_to_first_step_s']:.1f} s")
    print(f"\n## one incident at {args.gpus} GPUs (before: 30 min process-group timeout, no requeue, "
          f"{args.person_hours:g} h until a person resubmits; after: detection + {args.teardown_s:.0f} s "
          f"teardown + {args.requeue_s:.0f} s requeue + {args.startup_s:.0f} s start-up)")
    print("| fault | before | after | GPU-hours before | GPU-hours after | ratio |\n| --- | --- | --- | --- | --- | --- |")
    for r in result["extrapolation"]:
        print(f"| {r['fault']} | {r['before_s'] / 60:.1f} min | {r['after_s'] / 60:.1f} min | "
              f"{r['before_gpu_h']:.0f} | {r['after_gpu_h']:.0f} | {r['before_s'] / r['after_s']:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
