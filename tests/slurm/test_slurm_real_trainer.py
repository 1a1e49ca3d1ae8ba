"""The stage scripts and curriculum.sh with the REAL trainer (`python -m megafox.train`) and
configs/train/tiny.yaml on the local SLURM cluster, 2 CPU ranks (gloo).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.slurm.slurm_jobs import CI_SBATCH, PYTHON, REPO, copy_tree, job_env, job_output, sbatch, wait_job

TINY = REPO / "configs" / "train" / "tiny.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# stage2 must outlast the time-limit warning (it comes 8-30 s into a 1-minute job with a 30 s
# lead, and start-up takes ~10 s), so the preemption test always has something to interrupt:
# its steps also sleep (STEP_SLEEP x STAGE2_STEPS = 45 s), whatever the speed of the machine and
# of the trainer (faster steps once let the job finish before the warning)
STAGE2_STEPS = 150
STEP_SLEEP = "0.3"
COMPLETE = re.compile(r"^stage (\w+) complete: iteration=(\d+) loss=(\S+)$", re.M)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Data for configs/train/tiny.yaml and the overrides every job of this module uses."""
    from megafox.config import load_train_config
    from tests.training.fixtures import build_tiny_data

    data = build_tiny_data(tmp_path_factory.mktemp("tiny_data"))
    stage2 = load_train_config(TINY).stage("stage2")
    return [f"data_dir={data}", f"stages.stage2.token_budget={STAGE2_STEPS * stage2.batch_tokens}"]


def real_env(ckpt: Path, overrides, **extra) -> dict:
    return job_env(MEGAFOX_CONFIG=TINY, MEGAFOX_OVERRIDES=" ".join([f"checkpoint.dir={ckpt}", *overrides]), **extra)


def final_line(out: str, stage: str):
    found = [m.groups() for m in COMPLETE.finditer(out) if m.group(1) == stage]
    assert len(found) == 1, out[-3000:]
    return found[0]


@pytest.fixture(scope="module")
def stage1_ckpt(slurm_cluster, tiny_run, tmp_path_factory):
    """`sbatch launch/stage1.slurm` to completion: the checkpoint stage2 starts from."""
    work = tmp_path_factory.mktemp("stage1")
    (work / "logs").mkdir()
    job = sbatch("stage1.slurm", CI_SBATCH, real_env(work / "ckpt", tiny_run), work)
    info = wait_job(job, 300)
    out = job_output(work, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-3000:]
    final_line(out, "stage1")
    assert (work / "ckpt" / "stage1.done").is_file()
    return work / "ckpt"


@pytest.fixture(scope="module")
def stage2_reference(stage1_ckpt, tiny_run, tmp_path_factory):
    """`sbatch launch/stage2.slurm` without interruption: (job info, output, final line)."""
    work = tmp_path_factory.mktemp("stage2_ref")
    (work / "logs").mkdir()
    ckpt = copy_tree(stage1_ckpt, work / "ckpt")
    job = sbatch("stage2.slurm", CI_SBATCH, real_env(ckpt, tiny_run), work)
    info = wait_job(job, 300)
    out = job_output(work, job)
    return info, out, ckpt


def test_real_stage2_runs_to_completion(stage2_reference):
    info, out, ckpt = stage2_reference
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), out[-3000:]
    assert "tasks=2" in out
    assert re.search(r"^step .*stage=stage2 .*loss=", out, re.M), out[-3000:]
    stage, iteration, _ = final_line(out, "stage2")
    assert int(iteration) >= STAGE2_STEPS
    assert (ckpt / "stage2.done").is_file()


def test_real_time_limit_preemption_requeues_and_matches(stage1_ckpt, stage2_reference, tiny_run, tmp_path):
    """1-minute limit, USR1 30 s before it: the trainer must get the signal, save, exit 75; the
    script requeues; the requeued job resumes from `latest` and ends with the reference loss."""
    (tmp_path / "logs").mkdir()
    ckpt = copy_tree(stage1_ckpt, tmp_path / "ckpt")
    args = [a for a in CI_SBATCH if not a.startswith(("--time", "--signal"))] + ["--time=1", "--signal=B:USR1@30"]
    job = sbatch("stage2.slurm", args, real_env(ckpt, tiny_run, MEGAFOX_TRAIN_CMD=f"{PYTHON} -m tests.support.faults --step-sleep {STEP_SLEEP} --"), tmp_path)
    info = wait_job(job, 600)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-5000:]
    assert int(info["Restarts"]) >= 1, out[-5000:]
    assert "received SIGUSR1: forwarding it to the trainer" in out
    assert "stopping: signal SIGUSR1" in out  # the trainer's own log line: rank 0 got the signal
    assert "trainer exited with status 75" in out and f"requeueing job {job} (restart 1)" in out
    assert re.search(r"^resumed from .*stage=stage2", out, re.M), out[-5000:]
    assert final_line(out, "stage2") == final_line(stage2_reference[1], "stage2")


def test_real_curriculum_in_order(slurm_cluster, tiny_run, tmp_path):
    (tmp_path / "logs").mkdir()
    env = real_env(tmp_path / "ckpt", tiny_run[:1])  # stock stage budgets
    proc = subprocess.run([str(REPO / "launch" / "curriculum.sh"), *CI_SBATCH], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = dict(line.split() for line in proc.stdout.splitlines())
    assert list(jobs) == ["stage1", "stage2", "stage3"], proc.stdout
    infos = {s: wait_job(j, 600) for s, j in jobs.items()}
    for stage, job in jobs.items():
        out = job_output(tmp_path, job)
        assert (infos[stage]["JobState"], infos[stage]["ExitCode"]) == ("COMPLETED", "0:0"), out[-3000:]
        final_line(out, stage)
        assert (tmp_path / "ckpt" / f"{stage}.done").is_file()
    assert infos["stage1"]["EndTime"] <= infos["stage2"]["StartTime"] <= infos["stage2"]["EndTime"] \
        <= infos["stage3"]["StartTime"]
