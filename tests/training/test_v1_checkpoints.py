"""Checkpoints written by earlier megafox versions resume under today's trainer, bit for bit
(issue 13, issue 22: behaviour and on-disk formats must not change).

The checkpoints are committed fixtures (tests/training/old_checkpoints/, ~1 MB each, how each was
made is in its README.md), so the test needs no git history: each was written once by the old
commit itself, on tiny_data (tests/training/fixtures.py, rebuilt identically here), 2 CPU ranks,
harness.SMALL, and fox1-tiny shrunk to hidden 16 / ffn 32 to keep the files small.

- `v1`: megafox-dist-v1, written before the records refactor (commit a1dc436): a run killed after
  step 5 with its checkpoint at 4. Resumed by today's trainer, it must give the losses of today's
  own uninterrupted run, and the old run's first steps must equal that run's too. Its runs use a
  2,048-row vocabulary (the 2,000-piece tokenizer's ids all fit), which needs no padding at TP1:
  the old trainer put Megatron's padded rows into the softmax, today's leaves them out (issue
  21), so with tiny.yaml's padded 2,000 the two trainers train different models by design.
- `pre_package`: today's format (megafox-dist-v2, `sharded`), written by the last commit before
  the megafox/checkpoint package (d7d5290), at step 4 of a run whose uninterrupted losses
  (losses.json) that commit logged. Resumed by today's trainer, steps 5..8 must reproduce them.
"""
import json
import shutil
from pathlib import Path

import pytest

from tests.training.harness import latest, losses, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
OLD = Path(__file__).parent / "old_checkpoints"
SHRUNK = ["model.hidden_size=16", "model.ffn_hidden_size=32"]  # as the fixtures were saved


def _copy(name: str, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(OLD / name, root)
    return root


def test_v1_checkpoint_resumes_and_trajectories_are_unchanged(tiny_data, tmp_path):
    # its own uninterrupted run, not the shared `reference`: that one trains tiny.yaml's padded vocabulary
    interval = ["checkpoint.interval=2", "model.vocab_size=2048", *SHRUNK]  # no padded rows: see the docstring
    straight = tmp_path / "straight"
    rc, out = run_stage("stage1", straight, tiny_data, overrides=interval)
    assert rc == 0, out[-3000:]

    root = _copy("v1", tmp_path)
    assert latest(root) == 4
    assert '"format": "megafox-dist-v1"' in (root / "iter_0000004" / "megafox.json").read_text()
    old_losses = losses(root, "stage1")
    assert sorted(old_losses) == [1, 2, 3, 4, 5]

    rc, out = run_stage("stage1", root, tiny_data, overrides=interval)
    assert rc == 0, out[-3000:]
    assert f"resumed from {root / 'iter_0000004'}" in out
    assert "saved before checkpoints recorded their config; only the model shape is checked" in out
    resumed = losses(root, "stage1")  # steps 5..8 re-run by today's trainer replace the old run's 5
    expected = losses(straight, "stage1")
    assert {it: old_losses[it] for it in range(1, 5)} == {it: expected[it] for it in range(1, 5)}
    assert resumed == expected


def test_checkpoint_from_before_the_checkpoint_package_resumes_bit_identically(tiny_data, tmp_path):
    root = _copy("pre_package", tmp_path)
    expected = {int(it): loss for it, loss in json.loads((root / "losses.json").read_text()).items()}
    assert sorted(expected) == list(range(1, 9)) and sorted(losses(root, "stage1")) == [1, 2, 3, 4]
    assert '"format": "megafox-dist-v2"' in (root / "iter_0000004" / "megafox.json").read_text()

    rc, out = run_stage("stage1", root, tiny_data, overrides=SHRUNK)
    assert rc == 0, out[-3000:]
    assert f"resumed from {root / 'iter_0000004'}" in out
    assert "RNG states not restored" not in out  # same layout: the run continues exactly
    assert losses(root, "stage1") == expected  # steps 5..8 as the old commit's uninterrupted run logged them
