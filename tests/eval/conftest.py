import shutil

import pytest

from tests.eval.eval_helpers import save_hf_dir, stage_arc, stage_docstring_task, stage_gsm8k, tiny_model
from tests.support.processes import run_module
from tests.support.text import stdlib_texts
from tests.support.tokenizers import train_sentencepiece


@pytest.fixture(scope="session")
def staged(tmp_path_factory):
    """Tokenizer, staged datasets and the local task YAML (no model)."""
    root = tmp_path_factory.mktemp("eval_data")
    data = root / "data"
    stage_arc(data)
    stage_gsm8k(data)
    task_yaml = stage_docstring_task(root / "tasks", data)
    # Fox-1's ids, byte fallback, digits split; trained on stdlib prose + code
    tokenizer = train_sentencepiece(root / "tok", stdlib_texts(["argparse.py", "textwrap.py", "json/decoder.py",
                                                                "string.py", "difflib.py"]), 1000, split_digits=True)
    return {"root": root, "tokenizer": tokenizer, "data": data, "task_yaml": task_yaml}


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
