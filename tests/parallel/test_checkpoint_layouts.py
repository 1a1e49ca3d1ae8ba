"""A dist checkpoint saved at one layout loads at another with identical weights."""
import pytest
import torch

from megafox.checkpoint.errors import CheckpointError
from megafox.checkpoint.layout import read_metadata
from megafox.config import fox1_tiny
from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state

pytestmark = pytest.mark.multirank


def test_save_tp2_load_pp2_and_tp1(tmp_path):
    weights = hf_state(fox1_tiny(), seed=1)
    torch.save(weights, tmp_path / "hf.pt")
    root = tmp_path / "ckpt"
    run_distributed("tests/parallel/ckpt_bodies.py:save", 2, {"tensor_model_parallel_size": 2},
                    {"hf_path": str(tmp_path / "hf.pt"), "root": str(root)})
    assert (root / "latest").read_text().strip() == "5"
    assert read_metadata(root)["progress"] == {"stage": "stage1"}
    for layout, nproc in (({"pipeline_model_parallel_size": 2}, 2), ({}, 1)):
        out = run_distributed("tests/parallel/ckpt_bodies.py:load", nproc, layout, {"root": str(root)})
        assert out["iteration"] == 5
        for name, tensor in weights.items():
            if name != "lm_head.weight":
                assert torch.equal(out["weights"][name], tensor), (layout, name)


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "latest").write_text("3\n")
    with pytest.raises(CheckpointError, match="incomplete"):
        read_metadata(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "nope")
