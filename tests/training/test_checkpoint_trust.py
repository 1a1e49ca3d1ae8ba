"""Trust in every checkpoint (issue 17): corruption is detected and named, the run falls back to the
newest checkpoint that verifies (keeping the bad one), nothing usable -> exit 4, a full disk says so
and which checkpoint is still good, one run per checkpoint directory, no rank outlives its launcher,
a stop signal during start-up stops (75) instead of killing."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from megafox.checkpoint.errors import NoUsableCheckpoint
from megafox.checkpoint.integrity import find_usable_checkpoint
from megafox.checkpoint.layout import read_record
from tests.support.processes import assert_one_line_error
from tests.training.harness import (faulty_trainer, kill_session, latest, losses, run_stage, track, wait_for_line,
                                    worker_with_rank)

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
INTERVAL = ["checkpoint.interval=2"]


@pytest.fixture(scope="module")
def killed(tiny_data, tmp_path_factory):
    """stage1 on DP2 saved at iterations 2 and 4, killed -9 at the start of step 6."""
    root = tmp_path_factory.mktemp("killed") / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL, env=faulty_trainer("--kill-at-step", "6"))
    assert rc != 0 and latest(root) == 4, out[-3000:]
    return root


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated shard": (lambda d: os.truncate(d / "__0_0.distcp", 1000), "__0_0.distcp: 1000 bytes, the save wrote"),
    "one flipped bit": (lambda d: _flip_byte(d / "__0_1.distcp"), "__0_1.distcp: checksum mismatch"),
    "garbage megafox.json": (lambda d: (d / "megafox.json").write_text("{garbage"), "megafox.json: unreadable checkpoint record"),
    "deleted .metadata": (lambda d: (d / ".metadata").unlink(), ".metadata: missing"),
    "deleted common.pt": (lambda d: (d / "common.pt").unlink(), "common.pt: missing"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(killed, tmp_path, name):
    root = _copy(killed, tmp_path)
    corrupt, message = CORRUPTIONS[name]
    corrupt(root / "iter_0000004")
    record, skipped = find_usable_checkpoint(root)
    assert record.iteration == 2
    assert len(skipped) == 1 and skipped[0].startswith("iteration 4: ") and message in skipped[0], skipped
    assert (root / "iter_0000004").is_dir()  # never deleted


def test_megafox_ckpt_verify_checks_offline(killed, tmp_path):
    import sys

    from tests.training.harness import REPO

    root = _copy(killed, tmp_path)

    def verify(*args):
        return subprocess.run([sys.executable, "-m", "checkpoints_tools.cli", "verify", "--checkpoint", str(root),
                               *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    ok = verify("--iteration", "all")
    assert ok.returncode == 0 and "iter_0000002: OK" in ok.stdout and "iter_0000004: OK" in ok.stdout, ok.stdout
    _flip_byte(root / "iter_0000004" / "__0_1.distcp")
    bad = verify()  # latest
    assert bad.returncode == 1 and "iter_0000004: NOT usable: " in bad.stdout
    assert "__0_1.distcp: checksum mismatch" in bad.stdout and "Traceback" not in bad.stderr
    assert verify("--iteration", "2").returncode == 0
    missing = verify("--iteration", "9")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {root / 'iter_0000009'}: no such checkpoint (saved: [2, 4])"], missing.stderr


def test_checksum_cost_bench_runs(tmp_path):
    import sys

    from tests.training.harness import REPO

    got = subprocess.run([sys.executable, "bench/checkpoint_integrity.py", "--sizes-mb", "4,8", "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "| 64 | 0.36 GB |" in got.stdout and "Fox-1-1.6B training checkpoint: 23.3 GB" in got.stdout


def test_nothing_usable_names_every_checkpoint(killed, tmp_path):
    root = _copy(killed, tmp_path)
    _flip_byte(root / "iter_0000004" / "__0_0.distcp")
    os.truncate(root / "iter_0000002" / "__1_0.distcp", 10)
    with pytest.raises(NoUsableCheckpoint) as err:
        find_usable_checkpoint(root)
    assert "iteration 4:" in str(err.value) and "iteration 2:" in str(err.value)


def test_one_iteration_directory_is_that_checkpoint_or_none(killed, tmp_path):
    """`checkpoint.load: DIR/iter_N` (e.g. another run's stage end): that checkpoint, verified, never
    a fallback to a sibling."""
    root = _copy(killed, tmp_path)
    assert find_usable_checkpoint(root / "iter_0000002") == (read_record(root, 2), [])
    _flip_byte(root / "iter_0000004" / "__0_1.distcp")
    with pytest.raises(NoUsableCheckpoint, match=r"iter_0000004: not usable: .*__0_1.distcp: checksum mismatch"):
        find_usable_checkpoint(root / "iter_0000004")


def test_checkpoints_without_digests_are_checked_against_their_index(killed, tmp_path):
    """What older megafox (and model-only tools) saved: no `files` in the record."""
    root = _copy(killed, tmp_path)
    for it in (2, 4):
        meta = root / f"iter_{it:07d}" / "megafox.json"
        record = json.loads(meta.read_text())
        record.pop("files")
        meta.write_text(json.dumps(record))
    assert find_usable_checkpoint(root)[0].iteration == 4
    os.truncate(root / "iter_0000004" / "__0_1.distcp", 100)
    record, skipped = find_usable_checkpoint(root)
    assert record.iteration == 2 and "__0_1.distcp: truncated shard file (100 bytes" in skipped[0]


def test_resume_skips_a_silently_corrupt_checkpoint_and_trains_the_same_run(killed, reference, tiny_data, tmp_path):
    """One flipped bit in the newest checkpoint used to resume without a word and depart from the
    trajectory: now the trainer names the file, resumes from the one before, and every logged loss
    equals the uninterrupted run's."""
    root = _copy(killed, tmp_path)
    _flip_byte(root / "iter_0000004" / "__0_0.distcp")
    rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL)
    assert rc == 0, out[-4000:]
    assert "skipping an unusable checkpoint: iteration 4: " in out and "__0_0.distcp: checksum mismatch" in out
    assert f"falling back to iteration 2 ({root / 'iter_0000002'})" in out
    assert f"resumed from {root / 'iter_0000002'}" in out
    assert losses(root, "stage1") == losses(reference, "stage1")  # the uninterrupted run (conftest.py)
    kept = list(root.glob("iter_0000004.superseded-*"))
    assert len(kept) == 1 and (kept[0] / "__0_0.distcp").is_file()  # the bad one is kept for inspection


def test_no_usable_checkpoint_exits_4_in_one_line(killed, tiny_data, tmp_path):
    root = _copy(killed, tmp_path)
    for it in (2, 4):
        (root / f"iter_{it:07d}" / "megafox.json").write_text("not json")
    rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=INTERVAL)
    assert rc == 4, out[-3000:]
    lines = [line for line in out.splitlines() if "megafox-train: error:" in line]
    assert len(lines) == 1 and f"no usable checkpoint in {root}" in lines[0], out[-3000:]
    assert "Traceback" not in out


def test_a_resume_that_changes_the_config_is_refused_in_one_line_unless_allowed(killed, tiny_data, tmp_path):
    """A requeued job whose config now gives the partly trained stage another length: refused at
    start-up (exit 2, one line naming the checkpoint, the field and the way out), nothing written;
    with --allow-config-change the same command resumes from iteration 4 and trains to the new end."""
    root = _copy(killed, tmp_path)

    def checkpoints():  # every file of the run but the data cache (built before the config is compared)
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                if p.is_file() and p.relative_to(root).parts[0] != "data_cache" and "lock" not in p.name}

    before = checkpoints()
    assert "latest" in before and "iter_0000004/megafox.json" in before
    longer = INTERVAL + ["stages.stage1.token_budget=5120"]  # 10 steps of 8 x 64 tokens instead of 8
    rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=longer)
    line = assert_one_line_error(subprocess.CompletedProcess([], rc, "", out),
                                 f"{root / 'iter_0000004'}: resuming with a config that changes what this run has "
                                 f"trained would make it wrong: stages.stage1.token_budget: ",
                                 "(run with --allow-config-change to accept)")
    assert "5120" in line and "4096" in line, line
    assert checkpoints() == before  # nothing written, nothing touched

    rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=longer,
                        env={"MEGAFOX_TRAIN_ARGS": "--allow-config-change"})
    assert rc == 0, out[-4000:]
    assert "--allow-config-change: continuing despite: stages.stage1.token_budget: " in out, out[-4000:]
    assert f"resumed from {root / 'iter_0000004'}" in out and "stage stage1 complete: iteration=10" in out
    assert sorted(losses(root, "stage1")) == list(range(1, 11)) and latest(root) == 10


def test_a_full_disk_says_so_and_names_the_checkpoint_still_good(tiny_data, tmp_path):
    """The checkpoint directory on a 7 MB tmpfs: the first save (4.6 MB) fits, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)]).returncode != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    try:
        root = disk / "ckpt"
        rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL + [
            f"data.cache_dir={tmp_path / 'cache'}", f"logging.tensorboard_dir={tmp_path / 'tb'}"])
        assert rc == 1, out[-4000:]
        lines = [line for line in out.splitlines() if "megafox-train: error:" in line]
        assert len(lines) == 1, out[-4000:]
        # the cause first (what is full, how much is free, which checkpoint is still the latest),
        # torch's internal words ("unexpected pos ...") after it
        line = lines[0][lines[0].index("megafox-train: error: "):]
        head = line[:120]
        assert head.startswith("megafox-train: error: the disk is full: ") and " MiB free, a save needs " in head, line
        assert "iteration 2 is still the latest checkpoint" in head, line
        assert line.index("iteration 2 is still the latest") < line.index("saving iteration 4 to") \
            < line.index(" failed: "), line
        assert line.endswith("free space, then rerun to resume"), line
        assert latest(root) == 2 and not (root / "iter_0000004").exists()  # the partial save's space is given back
        assert find_usable_checkpoint(root)[0].iteration == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_one_run_per_checkpoint_dir_and_no_rank_outlives_its_launcher(tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    long = ["stages.stage1.token_budget=40960"]  # 80 steps of 0.5 s: alive for the whole test
    proc = run_stage("stage1", root, tiny_data, popen=True, overrides=long, env=faulty_trainer("--step-sleep", "0.5"))
    sessions = set()
    try:
        wait_for_line(proc, "step 2 ")
        track(proc, sessions)
        ranks = [worker_with_rank(proc.pid, r) for r in (0, 1)]
        # a second run on the same directory is refused in one line while the first is alive
        rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=long)
        assert rc == 5, out[-3000:]
        assert f"{root}: in use by another run (pid {ranks[0].pid} on " in out and "Traceback" not in out
        # kill -9 of the launcher's whole process group (an OOM kill, a dead login shell)
        os.killpg(proc.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, f"ranks outlived their launcher: {[p.pid for p in alive]}"
    finally:
        kill_session(proc, sessions)
    rc, out = run_stage("stage1", root, tiny_data, overrides=long)  # the lock died with them
    assert rc == 0 and "resumed from" in out, out[-3000:]


def test_a_stop_signal_during_start_up_stops_cleanly(tiny_data, tmp_path):
    """SIGUSR1 0.5 s after the ranks start, long before the trainer installs its handler: the ranks
    used to die of it (exit 1, no requeue). Now it is held until the handler exists: exit 75, and
    with no step run nothing is saved."""
    root = tmp_path / "ckpt"
    proc = run_stage("stage1", root, tiny_data, popen=True)
    sessions = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ranks = [worker_with_rank(proc.pid, r) for r in (0, 1)]
                break
            except AssertionError:
                time.sleep(0.05)
        time.sleep(0.5)
        for rank in ranks:
            rank.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=240)
        track(proc, sessions)
    finally:
        kill_session(proc, sessions)
    assert proc.returncode == 75, out[-4000:]
    assert "stopping: signal SIGUSR1; no step ran, nothing to save; exit 75" in out
    assert not (root / "latest").exists()


def test_ctrl_c_saves_and_stops_and_twice_stops_now(tiny_data, tmp_path):
    """Ctrl-C reaches launch/local.sh's process group (the ranks run in sessions of their own): the
    first one makes the ranks save after their step and exit 75, a second one stops them at once
    (130); never a KeyboardInterrupt or torchrun traceback."""
    long = ["stages.stage1.token_budget=40960"]
    for presses, expected in ((1, 75), (2, 130)):
        root = tmp_path / f"ctrl_c_{presses}"
        proc = run_stage("stage1", root, tiny_data, popen=True, overrides=long, env=faulty_trainer("--step-sleep", "1"))
        sessions = set()
        try:
            wait_for_line(proc, "step 2 ")
            track(proc, sessions)
            for _ in range(presses):
                os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.5)
            out, _ = proc.communicate(timeout=240)
        finally:
            kill_session(proc, sessions)
        assert proc.returncode == expected, out[-3000:]
        assert "Traceback" not in out and "KeyboardInterrupt" not in out and "ChildFailedError" not in out
        if expected == 75:
            assert "stopping: signal SIGTERM" in out and (root / "latest").is_file()
            assert find_usable_checkpoint(root)[0].iteration == latest(root)
        else:
            assert "stopping now without saving" in out
