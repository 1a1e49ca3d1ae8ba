import math

import pytest

from tests.training.fixtures import build_tiny_data
from tests.training.harness import losses, run_stage

STAGE1_STEPS = 8  # harness.SMALL: 4096 tokens / (8 x 64)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Real indexed datasets + SentencePiece tokenizer + blend.json per stage (~10 s)."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def reference(tiny_data, tmp_path_factory):
    """stage1 uninterrupted on DP2 (checkpoints at 4 and 8): the losses every interrupted run must
    reproduce, whatever its checkpoint interval. Shared by the trainer test modules (read, or
    copied before use), so the suite trains it once."""
    root = tmp_path_factory.mktemp("reference") / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data)
    assert rc == 0, out[-6000:]
    assert f"stage stage1 complete: iteration={STAGE1_STEPS}" in out
    ref = losses(root, "stage1")
    assert sorted(ref) == list(range(1, STAGE1_STEPS + 1))
    assert all(math.isfinite(v) for v in ref.values())
    assert ref[STAGE1_STEPS] < ref[1]  # it learns
    return root
