"""launch/*.slurm and launch/curriculum.sh on a real local SLURM cluster, 2 ranks on CPU.

The stub trainer (stub_trainer.py, same CLI/exit-status/.done contract as megafox-train) tests the
plumbing in seconds: srun ranks and rendezvous, USR1 forwarded to every rank, requeue, resume,
afterok ordering and cancellation. test_slurm_real_trainer.py runs the same paths with the real
trainer and configs/train/tiny.yaml.
"""
from __future__ import annotations

import filecmp
import re
import subprocess
from pathlib import Path

import pytest

from megafox.records import StageDone, read_stage_done, write_stage_done
from tests.slurm.slurm_jobs import (CI_SBATCH, PYTHON, REPO, job_env, job_output, sbatch, stub_env,
                                    wait_job)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

STUB_CONFIG = """\
# valid for megafox.config.load_train_config (curriculum.sh reads checkpoint.dir with it); the stub
# trainer ignores everything else
model: {preset: fox1-tiny}
stages:
  - {name: stage1, seq_length: 64, token_budget: 1024, batch_tokens: 512, data: stage1/blend.json}
  - {name: stage2, seq_length: 128, token_budget: 1024, batch_tokens: 512, data: stage2/blend.json}
  - {name: stage3, seq_length: 256, token_budget: 1024, batch_tokens: 512, data: stage3/blend.json}
checkpoint: {dir: checkpoints}
"""


def mark_done(ckpt, stage, iteration=1):
    write_stage_done(ckpt, StageDone(stage=stage, iteration=iteration, consumed_tokens=512, stage_samples=8))


def curriculum(workdir, env, *sbatch_args):
    proc = subprocess.run([str(REPO / "launch" / "curriculum.sh"), *sbatch_args], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    return proc, dict(line.split() for line in proc.stdout.splitlines())


def test_stage_script_outside_slurm_is_a_usage_error(tmp_path):
    env = job_env()
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "stage1.slurm")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr


def test_stub_stage2_ranks_and_rendezvous(slurm_cluster, workdir):
    ckpt = workdir / "ckpt"
    ckpt.mkdir()
    mark_done(ckpt, "stage1")
    job = sbatch("stage2.slurm", CI_SBATCH, stub_env(ckpt, MEGAFOX_STUB="steps=3"), workdir)
    info = wait_job(job, 60)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    out = job_output(workdir, job)
    host = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True,
                          text=True).stdout.split()[0]
    port = 20000 + int(job) % 20000
    assert f"stub trainer: stage=stage2 rank0 of 2 master={host}:{port} resume=0" in out
    assert "stage stage2 complete: iteration=3" in out
    assert read_stage_done(ckpt, "stage2").iteration == 3  # the record megafox.records reads


def test_stub_time_limit_signal_reaches_every_rank_and_requeues(slurm_cluster, workdir):
    """--signal=B:USR1@45 with a 1-minute limit signals only the batch shell ~15 s in; the script
    must pass it to both ranks, requeue on their exit 75, and the requeued run must resume."""
    ckpt = workdir / "ckpt"
    ckpt.mkdir()
    mark_done(ckpt, "stage1")
    args = [a for a in CI_SBATCH if not a.startswith(("--time", "--signal"))] + ["--time=1", "--signal=B:USR1@45"]
    job = sbatch("stage2.slurm", args, stub_env(ckpt, MEGAFOX_STUB="steps=30 step_seconds=1"), workdir)
    info = wait_job(job, 300)
    out = job_output(workdir, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert int(info["Restarts"]) >= 1, out
    for rank in (0, 1):  # the trainer itself (every rank) received the forwarded signal
        assert "SIGUSR1" in (ckpt / f"signals.rank{rank}").read_text()
    assert "received SIGUSR1: forwarding it to the trainer" in out
    assert f"checkpoint saved: requeueing job {job} (restart 1)" in out
    resumed = [int(m) for m in re.findall(r"resume=(\d+)", out)]
    assert resumed[0] == 0 and resumed[1] > 0, out  # the requeued run continued from the save
    assert "stage stage2 complete: iteration=30 loss=0.033333" in out


def test_stub_no_requeue_past_the_limit(slurm_cluster, workdir):
    ckpt = workdir / "ckpt"
    ckpt.mkdir()
    args = [a for a in CI_SBATCH if not a.startswith(("--time", "--signal"))] + ["--time=1", "--signal=B:USR1@45"]
    env = stub_env(ckpt, MEGAFOX_STUB="steps=60 step_seconds=1", MEGAFOX_MAX_REQUEUES=0)
    job = sbatch("stage1.slurm", args, env, workdir)
    info = wait_job(job, 120)
    out = job_output(workdir, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), out
    assert "MEGAFOX_MAX_REQUEUES=0): not requeueing" in out


def _stub_curriculum_env(workdir, **extra):
    config = workdir / "stub.yaml"
    config.write_text(STUB_CONFIG)
    return stub_env(workdir / "ckpt", MEGAFOX_CONFIG=config, **extra)


def test_stub_curriculum_in_order_and_rerun(slurm_cluster, workdir):
    env = _stub_curriculum_env(workdir, MEGAFOX_STUB="steps=2")
    proc, jobs = curriculum(workdir, env, *CI_SBATCH)
    assert proc.returncode == 0, proc.stderr
    assert list(jobs) == ["stage1", "stage2", "stage3"] and all(j.isdigit() for j in jobs.values()), proc.stdout
    infos = {s: wait_job(j, 120) for s, j in jobs.items()}
    for stage, info in infos.items():
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (stage, info)
        assert (workdir / "ckpt" / f"{stage}.done").is_file()
    assert infos["stage1"]["EndTime"] <= infos["stage2"]["StartTime"]
    assert infos["stage2"]["EndTime"] <= infos["stage3"]["StartTime"]
    # rerun: everything complete, nothing submitted
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc, again = curriculum(workdir, env, *CI_SBATCH)
    assert proc.returncode == 0 and again == {"stage1": "done", "stage2": "done", "stage3": "done"}, proc
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_stub_curriculum_rerun_reuses_queued_jobs(slurm_cluster, workdir):
    env = _stub_curriculum_env(workdir, MEGAFOX_STUB="steps=2")
    # hold stage1 so the chain is certainly still queued when we rerun
    proc, jobs = curriculum(workdir, env, *CI_SBATCH, "--hold")
    assert proc.returncode == 0, proc.stderr
    try:
        proc, again = curriculum(workdir, env, *CI_SBATCH, "--hold")
        assert proc.returncode == 0 and again == jobs, (proc.stderr, jobs, again)
        assert proc.stderr.count("reusing it") == 3
    finally:
        subprocess.run(["scancel", *jobs.values()])


def test_stub_curriculum_failed_stage_cancels_the_rest(slurm_cluster, workdir):
    env = _stub_curriculum_env(workdir, MEGAFOX_STUB="steps=2 fail=stage2")
    proc, jobs = curriculum(workdir, env, *CI_SBATCH)
    assert proc.returncode == 0, proc.stderr
    s1 = wait_job(jobs["stage1"], 60)
    s2 = wait_job(jobs["stage2"], 60)
    s3 = wait_job(jobs["stage3"], 60)
    assert (s1["JobState"], s2["JobState"], s2["ExitCode"]) == ("COMPLETED", "FAILED", "1:0")
    # cancelled by --kill-on-invalid-dep=yes (the test cluster does not set kill_invalid_depend)
    assert s3["JobState"] == "CANCELLED" and s3["Reason"] == "DependencyNeverSatisfied", s3
    assert not list((workdir / "logs").glob(f"*-{jobs['stage3']}.out"))  # it never started
    assert not (workdir / "ckpt" / "stage3.done").exists()
    # after fixing the cause, a rerun skips stage1 and submits stage2 -> stage3 again
    proc, again = curriculum(workdir, _stub_curriculum_env(workdir, MEGAFOX_STUB="steps=2"), *CI_SBATCH)
    assert again["stage1"] == "done" and again["stage2"] not in jobs.values(), proc.stdout
    for stage in ("stage2", "stage3"):
        assert wait_job(again[stage], 60)["JobState"] == "COMPLETED"


def test_curriculum_bad_config_submits_nothing(slurm_cluster, workdir):
    env = _stub_curriculum_env(workdir, MEGAFOX_OVERRIDES="checkpoint.dir=x stages.stage2.seq_length=-1")
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc, _ = curriculum(workdir, env, *CI_SBATCH)
    assert proc.returncode == 2
    assert "stub.yaml" in proc.stderr and "stages.stage2.seq_length" in proc.stderr, proc.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_curriculum_unreadable_done_record_submits_nothing(slurm_cluster, workdir):
    """A stage-done record that cannot be read is neither taken as done nor silently re-run: the
    launcher names the file and queues nothing."""
    env = _stub_curriculum_env(workdir)
    (workdir / "ckpt").mkdir()
    mark_done(workdir / "ckpt", "stage1")
    (workdir / "ckpt" / "stage2.done").write_text('{"iteration": 3}')  # fields missing
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc, _ = curriculum(workdir, env, *CI_SBATCH)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert "stage2.done" in proc.stderr and "stage_samples" in proc.stderr and "Traceback" not in proc.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_preprocess_array_matches_local_run(slurm_cluster, tmp_path):
    plan = REPO / "configs" / "data" / "tiny.yaml"
    local = tmp_path / "local"
    subprocess.run([str(PYTHON), "-m", "data_prep.plan", "--plan", str(plan), "--output-dir", str(local),
                    "--quiet"], cwd=REPO, check=True, timeout=300)
    env = job_env(DATA_PLAN=plan, OUTPUT_DIR=tmp_path / "slurm", ARRAY_COUNT=3, LOG_DIR=tmp_path / "logs",
                  SBATCH_ARGS="--cpus-per-task=1 --mem=1G --time=5")
    proc = subprocess.run(["bash", str(REPO / "launch" / "preprocess.slurm")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = re.search(r"tokenizer (\d+), array (\d+) \(3 tasks\), merge (\d+)", proc.stdout).groups()
    for job in ids:
        info = wait_job(job, 180)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    assert len(list((tmp_path / "logs").glob(f"*-{ids[1]}_*.out"))) == 3  # three array tasks ran
    shards = sorted(p.relative_to(local) for p in local.rglob("*") if p.suffix in (".bin", ".idx"))
    assert len(shards) >= 6
    for rel in shards + [Path(s) / "blend.json" for s in ("stage1", "stage2", "stage3")] + \
            [Path("tokenizer/tokenizer.vocab")]:
        assert filecmp.cmp(local / rel, tmp_path / "slurm" / rel, shallow=False), rel
