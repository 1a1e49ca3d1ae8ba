"""The real trainer on 2 emulated nodes x 2 ranks (TP2 inside a node, DP2 across nodes) of the
local SLURM cluster, through launch/curriculum.sh and `sbatch launch/stage1.slurm`.

One uninterrupted run is the reference. One job then lives through every fault the launcher must
survive without a person, one per run, and must still end with the reference's trajectory, bit
for bit (every step's loss, grad norm and LR in metrics/stage1.jsonl, re-run steps included):

  run 0  the time-limit warning (USR1 to the batch shell)  -> save, 75, requeue (preemption)
  run 1  rank 3 (second node) SIGKILLed at step 12          -> status 1, failure requeue 1
  run 2  rank 1 SIGSTOPped at step 18 (a hung GPU)          -> watchdog names it, every live rank
                                                               dumps its stacks, 6, failure requeue 2
  run 3  the first node lost (its slurmd and tasks killed)  -> SLURM: NODE_FAIL, requeue (failure 3)
  run 4  on the two nodes left                              -> completes
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.slurm_jobs import CLUSTER, PYTHON, REPO, job_env, job_info, job_output, sbatch, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TINY = REPO / "configs" / "train" / "tiny.yaml"
MULTINODE = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
             "--signal=B:USR1@20"]
# generous against a loaded 2-core machine, short against the defaults (seconds)
FAST_FAULTS = ["logging.interval=1", "parallel.tensor_model_parallel_size=2", "watchdog.heartbeat_seconds=1",
               "watchdog.peer_timeout_seconds=15"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from tests.training.fixtures import build_tiny_data

    return build_tiny_data(tmp_path_factory.mktemp("mn_data"))


def env_for(ckpt: Path, data: Path, **extra) -> dict:
    overrides = " ".join([f"checkpoint.dir={ckpt}", f"data_dir={data}", *FAST_FAULTS])
    return job_env(MEGAFOX_CONFIG=TINY, MEGAFOX_OVERRIDES=overrides, MEGAFOX_SRUN_WAIT=30, **extra)


def metrics(ckpt: Path) -> list:
    """Every training step's record, in the order written (validation records left out)."""
    records = [json.loads(line) for line in (ckpt / "metrics" / "stage1.jsonl").read_text().splitlines()]
    return [r for r in records if "grad_norm" in r]


def trajectory(records) -> dict:
    """iteration -> (loss, grad_norm, lr) exactly as logged (floats' full repr)."""
    return {r["iteration"]: (r["loss"], r["grad_norm"], r["lr"]) for r in records}


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_data, tmp_path_factory):
    """stage1 on 2 nodes x 2 ranks through curriculum.sh (MEGAFOX_STAGES=stage1), uninterrupted."""
    work = tmp_path_factory.mktemp("mn_reference")
    env = env_for(work / "ckpt", tiny_data, MEGAFOX_STAGES="stage1")
    proc = subprocess.run([str(REPO / "launch" / "curriculum.sh"), *MULTINODE], env=env, cwd=work,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = dict(line.split() for line in proc.stdout.splitlines())["stage1"]
    info = wait_job(job, 420)
    out = job_output(work, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), out[-3000:]
    return info, out, metrics(work / "ckpt")


def test_two_nodes_tp2_dp2_runs_to_completion(reference):
    info, out, records = reference
    nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True,
                           text=True).stdout.split()
    assert len(nodes) == 2, info["NodeList"]
    assert re.search(rf"tasks=4 master={nodes[0]}:\d+", out), out[:3000]
    assert "dp=2" in out  # 4 ranks, TP2: the data-parallel pair spans the two nodes
    assert re.search(r"^stage stage1 complete: iteration=32 ", out, re.M), out[-3000:]
    assert sorted(trajectory(records)) == list(range(1, 33))


def _runs(out: str) -> list:
    """The job log split at each run's start line."""
    return re.split(r"^\[megafox-launch [^\]]+\] job \d+ \(\S+\) stage=stage1 restart=", out, flags=re.M)[1:]


def _wait_for_run(work, job, run: int, min_step: int, timeout: float) -> str:
    """Block until run `run` of the job has logged step >= min_step; its log so far."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        logs = list((work / "logs").glob(f"*-{job}.out"))
        runs = _runs(logs[0].read_text()) if logs else []
        if len(runs) > run:
            steps = [int(s) for s in re.findall(r"^step (\d+) stage=stage1", runs[run], re.M)]
            if steps and max(steps) >= min_step:
                return runs[run]
        time.sleep(0.3)
    raise AssertionError(f"job {job} run {run} did not reach step {min_step} in {timeout}s: {job_info(job)}")


def _fault_to_end_s(run: str) -> float:
    """Seconds from the fault (the fault's own timestamp) to the launcher's 'trainer exited' line."""
    from datetime import datetime

    fault = re.search(r"^\[test fault\] .*\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\)$", run, re.M).group(1)
    end = re.search(r"^\[megafox-launch (\S+ \S+)\] trainer exited with status", run, re.M).group(1)
    fmt = "%Y-%m-%d %H:%M:%S"
    return (datetime.strptime(end, fmt) - datetime.strptime(fault, fmt)).total_seconds()


def test_every_fault_requeues_and_the_stage_ends_bit_identical(reference, tiny_data, tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "once").mkdir()
    ckpt = tmp_path / "ckpt"
    faults = (f"{PYTHON} -m tests.support.faults --step-sleep 0.3 --once {tmp_path / 'once'} "
              "--kill-at-step 12@3 --stop-at-step 18@1 --")
    job = sbatch("stage1.slurm", MULTINODE, env_for(ckpt, tiny_data, MEGAFOX_TRAIN_CMD=faults), tmp_path)
    killed = None
    try:
        _wait_for_run(tmp_path, job, 0, 4, 300)
        # the time-limit warning, as --signal=B:USR1@lead delivers it: to the batch shell only
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        _wait_for_run(tmp_path, job, 3, 14, 600)
        killed = subprocess.run(["scontrol", "show", "hostnames", job_info(job)["NodeList"]], capture_output=True,
                                text=True).stdout.split()[0]
        subprocess.run(["bash", str(CLUSTER), "kill-node", killed], check=True, timeout=60)
        info = wait_job(job, 600)
    finally:
        if killed:
            subprocess.run(["bash", str(CLUSTER), "revive-node", killed], timeout=120)
    out = job_output(tmp_path, job)
    runs = _runs(out)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-5000:]
    assert len(runs) == 5 and info["Restarts"] == "4", out[-5000:]

    # run 0: preemption
    assert "received SIGUSR1: forwarding it to the trainer" in runs[0] and "stopping: signal SIGUSR1" in runs[0]
    assert f"checkpoint saved: requeueing job {job} (restart 1)" in runs[0]
    # run 1: a dead rank on the second node ends the job, which requeues itself
    assert "[test fault] rank 3: kill at step 12" in runs[1]
    assert f"status 1 (failure): requeueing job {job} (failure restart 1 of at most 3)" in runs[1], runs[1][-3000:]
    assert _fault_to_end_s(runs[1]) <= 60, runs[1][-3000:]  # srun --wait (30 s) bounds the teardown
    # run 2: a stopped rank is named by rank 0's watchdog; every live rank dumps its stacks; exit 6
    assert "[test fault] rank 1: stop at step 18" in runs[2]
    assert re.search(r"megafox watchdog: no heartbeat \(limit 15s\): rank 1 \(host n\d, phase step, "
                     r"last reported step 1\d\) silent", runs[2]), runs[2][-5000:]
    for rank in (0, 2, 3):
        assert re.search(rf"megafox watchdog: rank {rank} \(host n\d, pid \d+, phase step, last step 18\) "
                         r"stops the job with exit 6; its Python stacks:", runs[2]), (rank, runs[2][-5000:])
    assert runs[2].count("most recent call first") >= 3
    # 15 s without a heartbeat + rank 0 keeping the store up 3 s + srun --wait 30 s for the stopped rank
    assert _fault_to_end_s(runs[2]) <= 90, runs[2][-3000:]
    assert f"status 6 (a rank hung or was lost (watchdog)): requeueing job {job} (failure restart 2" in runs[2]
    # run 3 -> 4: the node lost; SLURM requeued the job itself and the launcher counted it
    assert "failure restarts so far: 3 of at most 3" in runs[4], runs[4][:2000]
    assert killed not in runs[4].split("\n", 1)[0], runs[4][:300]  # run 4 is not on the lost node
    assert re.search(r"^resumed from .*stage=stage1", runs[4], re.M), runs[4][:3000]

    # the trajectory: every logged step, first run and re-runs alike, equals the reference's
    expected = trajectory(reference[2])
    records = metrics(ckpt)
    assert {r["iteration"] for r in records} == set(expected)
    for r in records:
        assert (r["loss"], r["grad_norm"], r["lr"]) == expected[r["iteration"]], r
    assert re.search(r"^stage stage1 complete: iteration=32 ", runs[4], re.M)
    assert (ckpt / "stage1.done").is_file()
