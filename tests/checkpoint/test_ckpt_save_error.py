"""The one line a failed save prints: a full disk is named first (how much is free, which checkpoint
is still the latest), the library's own words after it; any other failure names the library's error."""
import shutil
from collections import namedtuple

from megafox.checkpoint.saver import CheckpointSaveError

Usage = namedtuple("Usage", "total used free")
# what torch's zip writer raises when a shard no longer fits (it names no cause)
TORCH_TEXT = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _root_with_checkpoint(tmp_path, size):
    root = tmp_path / "a-long-checkpoint-directory-name-as-on-a-cluster" / "runs" / "fox1-1p6b" / "ckpt"
    (root / "iter_0000010").mkdir(parents=True)
    (root / "iter_0000010" / "__0_0.distcp").write_bytes(b"\0" * size)
    (root / "latest").write_text("10")
    return root


def test_a_full_disk_leads_with_the_cause_and_the_checkpoint_still_good(tmp_path, monkeypatch):
    root = _root_with_checkpoint(tmp_path, 3 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(8 << 20, 6 << 20, int(2.7 * 2**20)))
    line = "megafox-train: error: " + str(CheckpointSaveError(root, 12, RuntimeError(TORCH_TEXT)))
    head = line[:120]
    assert head.startswith("megafox-train: error: the disk is full: 2.7 MiB free, a save needs 3.0 MiB; ")
    assert "iteration 10 is still the latest checkpoint" in head, line
    assert line.index(f"saving iteration 12 to {root / 'iter_0000012'} failed: RuntimeError: {TORCH_TEXT}") > 120
    assert line.endswith("; free space, then rerun to resume")


def test_another_failure_names_the_error_and_the_checkpoint_still_good(tmp_path, monkeypatch):
    root = _root_with_checkpoint(tmp_path, 1 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(8 << 30, 1 << 30, 7 << 30))
    message = str(CheckpointSaveError(root, 12, OSError(5, "Input/output error")))
    assert message == (f"saving iteration 12 to {root / 'iter_0000012'} failed: OSError: [Errno 5] Input/output "
                       f"error; iteration 10 is still the latest checkpoint ({root}, untouched)")
    assert "disk is full" not in message
