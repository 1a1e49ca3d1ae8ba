"""A reduced `make demo`: the same script and steps, a smaller corpus and token budgets."""
import json

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.processes import REPO, clean_env, free_port, run_command
from tests.support.text import stdlib_texts

QUICK = ("stages.stage1.token_budget=65536 stages.stage2.token_budget=32768 stages.stage3.token_budget=16384 "
         "schedule.decay_tokens=16384 schedule.warmup_tokens=4096 validation.interval=8 checkpoint.interval=100")


def _exports_equal_their_checkpoints(out):
    """transformers on each export (base, instruct) against megafox on the checkpoint it came from,
    on real text: the models the demo hands out are the ones it trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "hf"), local_files_only=True)
    text = stdlib_texts(["textwrap.py"])[0]
    ids = [tok(text[i:i + 2000], add_special_tokens=False).input_ids[:96] for i in (0, 4000)]
    pairs = {"hf": "checkpoints", "hf_instruct": "checkpoints_sft"}
    ours = run_distributed("tests/support/checkpoint_model.py:logits", 1, {},
                           {"roots": [str(out / c) for c in pairs.values()], "ids": ids}, timeout=600)
    theirs = []
    for export in pairs:
        model = AutoModelForCausalLM.from_pretrained(str(out / export), local_files_only=True, dtype=torch.float32)
        with torch.no_grad():
            theirs.append(model.eval()(input_ids=torch.tensor(ids)).logits)
    for export, a, b in zip(pairs, theirs, ours):
        assert a.shape == b.shape and a.shape[:2] == (2, 96), (export, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m: f"{export}: {m}")
    assert (ours[0] - ours[1]).abs().max() > 0.1  # instruction tuning moved the weights: two different models


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the demo's own time limits: 900 s, then 600 s for the rerun
def test_reduced_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo_out"
    env = clean_env(DEMO_OUT=out, DEMO_CORPUS_MB="1.5", MEGAFOX_OVERRIDES=QUICK,
                    DEMO_SFT_OVERRIDES="stages.sft.epochs=2 validation.interval=5",
                    DEMO_MARGIN="-1", MASTER_PORT=free_port(), PYTHON=REPO / ".venv/bin/python")
    run = run_command(["bash", "demo/run.sh"], env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["stage1", "stage2", "stage3"]
    assert [s["seq_length"] for s in summary["stages"].values()] == [256, 512, 1024]
    assert summary["stages"]["stage3"]["final_loss"] < summary["stages"]["stage1"]["first_loss"] - 1.5
    assert summary["trained_tokens"] == 65536 + 32768 + 16384
    assert summary["generation"].strip()
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    for stage in ("stage1", "stage2", "stage3"):
        assert (out / "checkpoints" / f"{stage}.done").is_file()
    # instruction tuning from the pretrained weights: masked loss down, a chat through the exported template
    assert (out / "checkpoints_sft" / "sft.done").is_file()
    assert summary["sft"]["final_loss"] < summary["sft"]["first_loss"]
    assert "<|user|>" in summary["chat"]["prompt"] and summary["chat"]["prompt"].rstrip().endswith("<|assistant|>")
    assert summary["chat"]["reply"].strip()
    assert (out / "sft_loss.png").stat().st_size > 10_000
    assert (out / "hf_instruct" / "tokenizer_config.json").is_file()
    # both exports were verified by megafox-to-hf --verify, and equal their checkpoints here
    assert run.stdout.count("verify: weights: all ") == 2 and run.stdout.count("(tolerance 1.0e-04): OK") == 2, \
        run.stdout[-3000:]
    _exports_equal_their_checkpoints(out)

    # A rerun reuses every finished step.
    again = run_command(["bash", "demo/run.sh"], env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "reusing" in again.stdout and "already complete" in again.stdout
