"""Runs the real `launch/local.sh` -> torchrun -> `megafox-train` for the trainer tests and reads
what the runs leave behind (metrics, sample logs, checkpoints)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tests.support.processes import REPO, ctrl_c_reaches_it, free_port

LOCAL_SH = REPO / "launch" / "local.sh"

# configs/train/tiny.yaml, shrunk: stage1 = 8 steps of 8 x 64 tokens, stage2 = 4 steps of 8 x 128.
# Cosine (not WSD) so an LR reset at a stage boundary would show in the LR.
SMALL = [
    "micro_batch_size=2",
    "stages.stage1.token_budget=4096", "stages.stage1.batch_tokens=512",
    "stages.stage2.token_budget=4096", "stages.stage2.batch_tokens=1024",
    "schedule.style=cosine", "schedule.decay_tokens=null", "schedule.warmup_tokens=1024",
    "validation.interval=0", "logging.interval=1", "debug.log_samples=true",
    "checkpoint.interval=4", "checkpoint.keep_last=20",
]


def faulty_trainer(*faults: str) -> Dict[str, str]:
    """The environment that makes the launcher run megafox-train with test-side fault callbacks
    (tests.support.faults), e.g. faulty_trainer("--kill-at-step", "7")."""
    return {"MEGAFOX_TRAIN_CMD": " ".join([sys.executable, "-m", "tests.support.faults", *faults, "--"])}


def run_stage(stage: str, root: Path, data: Path, nproc: int = 2, overrides: List[str] = (),
              env: Optional[Dict[str, str]] = None, timeout: float = 300, popen: bool = False,
              config: str = "tiny.yaml", small: List[str] = SMALL):
    """Run one stage through launch/local.sh; return (exit status, combined output)."""
    full_env = dict(os.environ)
    full_env.update({
        "MEGAFOX_CONFIG": str(REPO / "configs" / "train" / config), "MEGAFOX_NPROC": str(nproc),
        "MEGAFOX_MASTER_PORT": str(free_port()), "MEGAFOX_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
        "MEGAFOX_OVERRIDES": " ".join([f"data_dir={data}", f"checkpoint.dir={root}", *small, *overrides]),
    })
    full_env.update(env or {})
    cmd = ["bash", str(LOCAL_SH), stage]
    if popen:
        return subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, preexec_fn=ctrl_c_reaches_it)
    # Output goes to a file, not a pipe: after a crash or kill -9, the checkpoint writer's helper
    # processes outlive the ranks and would hold a pipe open.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        sessions: set = set()
        deadline = time.monotonic() + timeout
        try:
            while True:
                track(proc, sessions)
                try:
                    proc.wait(timeout=0.5)  # returns as the launcher exits, not at the next half second
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(cmd, timeout) from None
        finally:
            kill_session(proc, sessions)
        log.seek(0)
        return proc.returncode, log.read()


def track(proc, sessions: set) -> None:
    """Remember the launcher's descendants: torchrun starts every rank in a session of its own,
    and the checkpoint writer's helper processes (multiprocessing Manager, resource tracker) stay
    in it, outliving a rank that crashed or was killed -9."""
    import psutil

    try:
        sessions.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        pass


def kill_session(proc, sessions=()) -> None:
    """Kill what is left of the sessions this test's launcher and its ranks led (nothing else)."""
    import psutil

    if proc.poll() is None:
        proc.kill()
    sids = {proc.pid, *sessions}  # start_new_session: the launcher leads its own session
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) in sids:
                p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue


def metrics(root: Path, stage: str) -> Dict[int, dict]:
    """Per-iteration records; a step re-run after a resume replaces the killed run's record."""
    out = {}
    path = Path(root) / "metrics" / f"{stage}.jsonl"
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["iteration"]] = rec
    return out


def losses(root: Path, stage: str) -> Dict[int, float]:
    return {it: rec["loss"] for it, rec in metrics(root, stage).items()}


def sample_ids(root: Path, stage: str) -> Dict[int, List[int]]:
    """{iteration: stage sample ids of the global batch}, merged over DP ranks; last run wins."""
    per_rank = {}
    for path in sorted((Path(root) / "samples").glob(f"{stage}.dp*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_rank[(path.name, rec["iteration"])] = rec["samples"]
    merged: Dict[int, List[int]] = {}
    for (_, it), ids in sorted(per_rank.items(), key=lambda kv: kv[0][1]):
        merged.setdefault(it, []).extend(ids)
    return merged


def latest(root: Path) -> int:
    return int((Path(root) / "latest").read_text())


def model_tensors(iter_dir: Path, tmp: Path) -> Dict[str, torch.Tensor]:
    """The model weights of a dist checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(tmp) / f"{Path(iter_dir).name}.pt"
    dcp_to_torch_save(str(iter_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.startswith("optimizer.") and "_extra_state" not in k}


def adam_step(iter_dir: Path) -> float:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    return float(common["optimizer"]["optimizer"]["param_groups"][0]["step"])


def wait_for_line(proc, needle: str, timeout: float = 240) -> List[str]:
    """Read proc's output until a line contains `needle`; return the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines[-40:])}")


def worker_with_rank(launcher_pid: int, rank: int):
    """The megafox-train worker process of `rank` under a local.sh launcher."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
            if ("megafox.train" in line or "tests.support.faults" in line) and child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")
