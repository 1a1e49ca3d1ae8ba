import dataclasses

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.checkpoints_tools.ckpt_tools_helpers import run_tool, save_hf_dir, tiny, train_sp


@pytest.fixture(scope="session")
def sp_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    return {"fox": train_sp(tmp / "fox", 1000, "fox"), "gemma": train_sp(tmp / "gemma", 1000, "gemma")}


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory):
    """fox1-tiny HF weights -> a megafox checkpoint (`ckpt`) -> a bf16 HF export (`export`, verified)."""
    tmp = tmp_path_factory.mktemp("tiny")
    save_hf_dir(tiny(tie=True), tmp / "hf", seed=1)
    proc = run_tool("from_hf", "--hf", tmp / "hf", "--output", tmp / "ckpt", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run_tool("to_hf", "--checkpoint", tmp / "ckpt", "--output", tmp / "export", "--no-progress", "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"hf": tmp / "hf", "ckpt": tmp / "ckpt", "export": tmp / "export", "export_stdout": proc.stdout}


@pytest.fixture(scope="session")
def training_checkpoint(tmp_path_factory):
    """A real training checkpoint (model, optimizer, RNG state) saved by the trainer's save path."""
    from tests.support.hf_reference import hf_state

    tmp = tmp_path_factory.mktemp("train")
    model = tiny(tie=True)
    torch.save(hf_state(model, seed=5), tmp / "init.pt")
    run_distributed("tests/checkpoints_tools/bodies.py:train_and_save", 1, {},
                    {"model": dataclasses.asdict(model), "hf_path": str(tmp / "init.pt"), "root": str(tmp / "ckpt")})
    return tmp / "ckpt"
