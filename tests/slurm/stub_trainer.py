"""A stand-in for `megafox-train` that keeps its launcher contract and nothing else, so the SLURM
scripts' plumbing (ranks, rendezvous, signals, requeue, .done files) is tested in seconds:
arguments --config/--stage, checkpoint.dir from MEGAFOX_OVERRIDES, its own knobs from
MEGAFOX_STUB ("steps=N step_seconds=S fail=<stage> exit=<status>"), resume from <dir>/<stage>.state, exit 75 after a save on
SIGUSR1/SIGTERM, <dir>/<stage>.done at the end, `stage <s> complete: iteration=<i> loss=<l>`.
"""
import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from megafox.records import StageDone, write_stage_done

STAGES = ["stage1", "stage2", "stage3"]
SAMPLES_PER_STEP, TOKENS_PER_STEP = 8, 8 * 2048


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--stage", required=True)
    a = p.parse_args()
    ov = dict(kv.split("=", 1) for kv in shlex.split(os.environ.get("MEGAFOX_OVERRIDES", "")))
    root = Path(ov["checkpoint.dir"])
    root.mkdir(parents=True, exist_ok=True)
    knobs = dict(kv.split("=", 1) for kv in shlex.split(os.environ.get("MEGAFOX_STUB", "")))
    steps, dt = int(knobs.get("steps", 5)), float(knobs.get("step_seconds", 0.2))
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    got = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
    if (root / f"{a.stage}.done").exists():
        say(f"stage {a.stage} already complete; nothing to do")
        return 0
    i = STAGES.index(a.stage)
    if i and not (root / f"{STAGES[i - 1]}.done").exists():
        say(f"megafox-train: error: stage {STAGES[i - 1]} comes first and is not complete")
        return 2
    if knobs.get("fail") == a.stage:
        say(f"megafox-train: error: failing {a.stage} on purpose")
        return 1
    if "exit" in knobs:  # a trainer that ends with this status (e.g. 3 NaN halt, 6 watchdog)
        say(f"megafox-train: error: exiting {knobs['exit']} on purpose")
        return int(knobs["exit"])
    state = root / f"{a.stage}.state"
    it = int(state.read_text()) if state.exists() else 0
    say(f"stub trainer: stage={a.stage} rank0 of {world} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} resume={it}")
    while it < steps:
        time.sleep(dt)
        it += 1
        say(f"step {it} stage={a.stage} loss={1.0 / it:.6f}")
        if got:
            with open(root / f"signals.rank{rank}", "a") as f:
                f.write(" ".join(got) + "\n")
            if rank == 0:
                state.write_text(str(it))
            say(f"stopping: signal {got[0]}; checkpoint at iteration {it}")
            return 75
    if rank == 0:  # the trainer's own record, written through megafox.records as megafox-train does
        write_stage_done(root, StageDone(stage=a.stage, iteration=it, consumed_tokens=it * TOKENS_PER_STEP,
                                         stage_samples=it * SAMPLES_PER_STEP, loss=1.0 / it))
    say(f"stage {a.stage} complete: iteration={it} loss={1.0 / it:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
