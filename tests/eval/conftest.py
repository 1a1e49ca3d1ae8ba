import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_helpers import (run_module, save_hf_dir, stage_arc, stage_docstring_task, stage_gsm8k,  # noqa: E402
                          tiny_model, train_tokenizer)


@pytest.fixture(scope="session")
def staged(tmp_path_factory):
    """Tokenizer, staged datasets and the local task YAML (no model)."""
    root = tmp_path_factory.mktemp("eval_data")
    data = root / "data"
    stage_arc(data)
    stage_gsm8k(data)
    task_yaml = stage_docstring_task(root / "tasks", data)
    return {"root": root, "tokenizer": train_tokenizer(root / "tok"), "data": data, "task_yaml": task_yaml}


@pytest.fixture(scope="session")
def material(staged, tmp_path_factory):
    """A peaked random Llama -> `megafox-from-hf` checkpoint (which records the tokenizer, as a
    training run's does) -> `megafox-to-hf` export (fp32, tokenizer included): the in-process
    evaluation reads the checkpoint, lm_eval's `hf` model the export."""
    root = tmp_path_factory.mktemp("eval_model")
    model = tiny_model()
    save_hf_dir(model, root / "hf_init", seed=3)
    shutil.copy(staged["tokenizer"], root / "hf_init" / "tokenizer.model")  # recorded in the checkpoint
    proc = run_module("checkpoints_tools.from_hf", "--hf", root / "hf_init", "--output", root / "ckpt",
                      "--tp", 1, "--pp", 1, "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_module("checkpoints_tools.to_hf", "--checkpoint", root / "ckpt", "--output", root / "export",
                      "--dtype", "fp32", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(staged, model=model, ckpt=root / "ckpt", export=root / "export", tmp=root)
