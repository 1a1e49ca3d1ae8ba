"""Which trainer statuses the SLURM scripts requeue (launch/common.sh), with the stub trainer on
the local cluster: 2, 3, 4, 5 never; a SIGTERM stop (scancel, preemption: 75) never; a failure
(6, the watchdog's; 7, a failed rendezvous) at most MEGAFOX_MAX_FAILURE_RESTARTS times. The jobs are submitted
together and run side by side on the cluster's nodes."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.slurm.slurm_jobs import CI_SBATCH, job_info, job_output, sbatch, stub_env, wait_job
from tests.slurm.test_slurm_launchers import mark_done

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _submit(workdir, name, stub, **extra):
    work = workdir / name
    (work / "logs").mkdir(parents=True)
    ckpt = work / "ckpt"
    ckpt.mkdir()
    mark_done(ckpt, "stage1")
    return work, sbatch("stage2.slurm", CI_SBATCH, stub_env(ckpt, MEGAFOX_STUB=stub, **extra), work)


def _wait_for(work, job, text, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        logs = list((work / "logs").glob(f"*-{job}.out"))
        if logs and text in logs[0].read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job}: {text!r} not in its log after {timeout}s: {job_info(job)}")


def test_final_statuses_are_never_requeued_and_failures_are_bounded(slurm_cluster, tmp_path):
    jobs = {status: _submit(tmp_path, f"exit{status}", f"exit={status}") for status in (3, 4, 5)}
    retried = _submit(tmp_path, "exit6", "exit=6", MEGAFOX_MAX_FAILURE_RESTARTS=2)
    rendezvous = _submit(tmp_path, "exit7", "exit=7", MEGAFOX_MAX_FAILURE_RESTARTS=1)
    stopped = _submit(tmp_path, "sigterm", "steps=120 step_seconds=1")
    # SIGTERM to the batch shell and every rank, as at a preemption or `scancel`: save, 75, no
    # requeue (not --full: that signals srun too, which then kills its tasks before they can save)
    _wait_for(*stopped, "step 2 ", 120)
    subprocess.run(["scancel", "--batch", "--signal=TERM", stopped[1]], check=True)
    subprocess.run(["scancel", "--signal=TERM", stopped[1]], check=True)

    for status, (work, job) in jobs.items():
        info = wait_job(job, 180)
        out = job_output(work, job)
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", f"{status}:0", "0"), out
        assert f"status {status} (" in out and "is not retryable: not requeueing" in out, out

    info = wait_job(stopped[1], 180)
    out = job_output(*stopped)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), out
    assert "received SIGTERM" in out and "stopped by SIGTERM" in out and "requeueing job" not in out, out

    work, job = retried
    info = wait_job(job, 300)
    out = job_output(work, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "6:0", "2"), out
    assert "(failure restart 1 of at most 2)" in out and "(failure restart 2 of at most 2)" in out, out
    assert "already 2 failure restarts (MEGAFOX_MAX_FAILURE_RESTARTS=2): not requeueing" in out, out

    work, job = rendezvous  # a rendezvous that never completed (7) is retried like any failure
    info = wait_job(job, 300)
    out = job_output(work, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "7:0", "1"), out
    assert "status 7 (the rendezvous never completed): requeueing job" in out, out
