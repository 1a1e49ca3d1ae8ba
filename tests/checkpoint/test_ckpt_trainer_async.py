"""Asynchronous saves in the real trainer (launch/local.sh -> torchrun, 2 CPU ranks, real data):
the next step runs while a save is written, the save is committed only once every rank's shards
are on disk, a kill or crash before the commit leaves the previous checkpoint as `latest`, the
resumed run is bit-identical to an uninterrupted synchronous one, and a stop waits for the save."""
import pytest

from megafox.checkpoint.integrity import find_usable_checkpoint
from megafox.checkpoint.layout import read_record
from megafox.records import METADATA_FILE
from tests.training.harness import faulty_trainer, latest, losses, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
INTERVAL = ["checkpoint.interval=2"]
ASYNC = INTERVAL + ["checkpoint.async_save=true"]
SHARDS = ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """stage1 uninterrupted, synchronous saves: the losses every run below must reproduce."""
    root = tmp_path_factory.mktemp("straight") / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL)
    assert rc == 0, out[-3000:]
    return losses(root, "stage1")


def _line(lines, needle):
    found = [i for i, line in enumerate(lines) if needle in line]
    assert found, f"no line with {needle!r}"
    return found[0]


def test_kill_while_a_save_is_written_keeps_the_previous_one_and_resumes_bit_exact(straight, tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=ASYNC, env=faulty_trainer("--kill-at-step", "5"))
    assert rc != 0, out[-3000:]
    lines = out.splitlines()
    # iteration 2 was staged, step 3 trained while it was written, then it was committed
    assert _line(lines, "saving checkpoint iteration 2 in the background") < _line(lines, "step 3 ") \
        < _line(lines, f"saved checkpoint {root / 'iter_0000002'} (iteration 2")
    # iteration 4 was started at the end of step 4, and the kill at the start of step 5 came first
    assert "saving checkpoint iteration 4 in the background" in out and "iteration 4," not in out
    assert latest(root) == 2 and not (root / "iter_0000004" / METADATA_FILE).exists()
    rc, out = run_stage("stage1", root, tiny_data, overrides=ASYNC)
    assert rc == 0, out[-3000:]
    assert f"resumed from {root / 'iter_0000002'}" in out
    assert losses(root, "stage1") == straight
    assert latest(root) == 8 and read_record(root).stage_end  # the stage-end save is complete


def test_a_crash_in_an_async_save_hits_after_the_shards_and_before_the_record(tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=ASYNC, env=faulty_trainer("--crash-in-save", "2"))
    assert rc != 0 and "crashing in save #2 before metadata" in out, out[-3000:]
    saved = root / "iter_0000004"
    assert sorted(p.name for p in saved.glob("*.distcp")) == SHARDS and (saved / ".metadata").is_file()
    assert not (saved / METADATA_FILE).exists() and latest(root) == 2
    assert find_usable_checkpoint(root)[0].iteration == 2


def test_a_stop_waits_for_the_save_in_flight(tiny_data, tmp_path):
    root = tmp_path / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, nproc=1, overrides=["checkpoint.interval=1", "checkpoint.async_save=true"],
                        env={"MEGAFOX_TRAIN_ARGS": "--exit-after-minutes 0.0001"})
    assert rc == 75, out[-3000:]
    assert "saving checkpoint iteration 1 in the background" in out
    assert latest(root) == 1 and read_record(root).run_state.consumed_samples == {"stage1": 8}
    assert find_usable_checkpoint(root) == (read_record(root), [])
