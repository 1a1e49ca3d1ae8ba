"""Submitting SLURM jobs and waiting for them, for the launcher tests.

There is no accounting database (no slurmdbd), so job states come from `scontrol show job`
(the test cluster keeps finished jobs for MinJobAge=600 s) and the job's own output file."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.processes import REPO

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
STUB = REPO / "tests" / "slurm" / "stub_trainer.py"
PYTHON = REPO / ".venv" / "bin" / "python"
# The stage scripts' real-cluster header asks for 16 nodes x 8 GPUs; CI runs 2 CPU ranks.
# The stage scripts ask for a 10-minute signal lead; with a 5-minute limit that would signal at once.
CI_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
             "--signal=B:USR1@20"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def job_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("MEGAFOX_TRAIN_CMD", "MEGAFOX_TRAIN_ARGS", "MEGAFOX_OVERRIDES", "MEGAFOX_STUB", "MEGAFOX_HOME"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def stub_env(ckpt: Path, **extra) -> dict:
    extra.setdefault("MEGAFOX_OVERRIDES", f"checkpoint.dir={ckpt}")
    return job_env(MEGAFOX_TRAIN_CMD=f"{PYTHON} {STUB}", **extra)


def sbatch(script: str, args, env, cwd) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args, str(REPO / "launch" / script)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job: str, timeout: float) -> dict:
    """Poll until the job reaches a final state (a requeued job goes back to PENDING meanwhile)."""
    end = time.monotonic() + timeout
    while True:
        info = job_info(job)
        if info.get("JobState") in FINAL:
            return info
        if time.monotonic() > end:
            subprocess.run(["scancel", job])
            raise AssertionError(f"job {job} not finished after {timeout}s: {info}")
        time.sleep(1)


def job_output(workdir: Path, job: str) -> str:
    logs = list((workdir / "logs").glob(f"*-{job}.out"))
    assert len(logs) == 1, f"expected one log for job {job} in {workdir / 'logs'}: {logs}"
    return logs[0].read_text()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
