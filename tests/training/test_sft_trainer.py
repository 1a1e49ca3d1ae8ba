"""Fox-1-Instruct's stage through the real trainer (issue 14): chat data -> data_prep's SFT shards
-> megafox-train on a `kind: sft` stage starting from a pretraining run's weights -> megafox-to-hf
with the chat template -> transformers chats with the model through apply_chat_template."""
import json
import math

import pytest
import torch

from megafox.checkpoint.layout import read_record
from tests.support.distributed import run_distributed
from tests.support.processes import run_module
from tests.training.harness import faulty_trainer, latest, losses, metrics, run_stage, sample_ids

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
# tiny_sft.yaml shrunk: 2 epochs of packed 256-token rows, 8 rows a step, micro-batch 2
SFT = ["stages.sft.seq_length=256", "stages.sft.batch_tokens=2048", "stages.sft.epochs=2", "micro_batch_size=2",
       "schedule.warmup_tokens=2048", "validation.interval=0", "logging.interval=1", "debug.log_samples=true",
       "checkpoint.interval=4", "checkpoint.keep_last=20"]


@pytest.fixture(scope="module")
def sft_data(tiny_data, tmp_path_factory):
    """Real chat records (stdlib docstrings) -> `make preprocess`'s SFT stage with the tokenizer the
    tiny model was pretrained with."""
    root = tmp_path_factory.mktemp("sft_data")
    run_module("data_prep.sft_offline_chat", "--output", root / "raw", check=True)
    plan = root / "plan.yaml"
    plan.write_text(json.dumps({
        "output_dir": str(root / "out"), "tokenizer": {"model": str(tiny_data / "tokenizer.model")},
        "preprocess": {"workers": 2},
        "stages": {"sft": {"kind": "sft", "chat_template": "fox1", "seq_length": 256, "overlong": "truncate",
                           "token_budget": 100000,
                           "sources": [{"name": "chat", "globs": [str(root / "raw" / "chat.jsonl")]},
                                       {"name": "alpaca", "globs": [str(root / "raw" / "alpaca.jsonl.gz")]}]}}}))
    run_module("data_prep.plan", "--plan", plan, check=True)
    return root / "out"


@pytest.fixture(scope="module")
def pretrained(reference):
    """The pretraining run SFT starts from: conftest.py's stage-1 run (8 steps on DP2), trained
    once for all the trainer tests; only read here (checkpoint.init_from)."""
    return reference


@pytest.fixture(scope="module")
def finetuned(sft_data, pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft") / "ckpt"
    rc, out = run_stage("sft", root, sft_data, config="tiny_sft.yaml", small=SFT,
                        overrides=[f"checkpoint.init_from={pretrained}"])
    assert rc == 0, out[-4000:]
    return root, out


def test_sft_starts_from_the_pretrained_weights_and_learns_the_answers(finetuned, pretrained):
    root, out = finetuned
    assert f"initialized weights from {pretrained / f'iter_{latest(pretrained):07d}'}" in out
    assert "optimizer, schedule and data start fresh" in out
    m = metrics(root, "sft")
    steps = sorted(m)
    # its own run: iteration and token count start at 0, its own schedule (warmup = one batch, then
    # cosine from tiny_sft.yaml's 2e-3 down to 2e-4 over its own length)
    assert steps[0] == 1 and m[1]["consumed_tokens"] == 2048
    assert m[1]["lr"] == pytest.approx(2e-3) and m[steps[-1]]["lr"] == pytest.approx(2e-4, rel=1e-6)
    first, last = m[steps[0]]["loss"], m[steps[-1]]["loss"]
    assert math.isfinite(last) and last < first - 0.5, (first, last)  # the masked loss drops
    # only assistant tokens (and their eos) are trained: far fewer loss tokens than rows x length
    assert all(0 < rec["loss_tokens"] < 8 * 256 for rec in m.values())
    record = read_record(root)
    assert record.stage == "sft" and record.stage_end and "chat_template" in record.tokenizer


def test_sft_kill_mid_epoch_resumes_bit_exact_and_each_conversation_once_per_epoch(finetuned, sft_data, pretrained,
                                                                                    tmp_path):
    reference, _ = finetuned
    steps = max(losses(reference, "sft"))
    root = tmp_path / "ckpt"
    kill_at = steps // 2 + 2  # inside the first or second epoch, after a save at a multiple of 4
    rc, out = run_stage("sft", root, sft_data, config="tiny_sft.yaml", small=SFT,
                        overrides=[f"checkpoint.init_from={pretrained}"], env=faulty_trainer("--kill-at-step", str(kill_at)))
    assert rc != 0 and latest(root) < kill_at, out[-3000:]
    rc, out = run_stage("sft", root, sft_data, config="tiny_sft.yaml", small=SFT,
                        overrides=[f"checkpoint.init_from={pretrained}"])
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "initialized weights" not in out  # its own checkpoint, not init_from again
    assert losses(root, "sft") == losses(reference, "sft")
    # every global batch is the next run of sample ids; mapped to conversations, each epoch holds
    # every training conversation exactly once
    from megafox.data.sft_data import SFTData

    data = SFTData(str(sft_data / "sft" / "blend.json"), 256, 8, seed=1234, epochs=2, valid_fraction=0.05,
                   cache_dir=str(root / "data_cache"))
    ids = sample_ids(root, "sft")
    ordered = [i for it in sorted(ids) for i in sorted(ids[it])]
    assert ordered == list(range(len(ordered)))
    seen = {}
    for sample in ordered:
        for conversation in data.conversations_of(sample):
            seen.setdefault(conversation, 0)
            seen[conversation] += 1
    assert seen and set(seen.values()) == {2}, "every conversation once in each of the 2 epochs"


def test_exported_instruct_model_chats_through_its_chat_template(finetuned, sft_data, tmp_path):
    root, _ = finetuned
    out_dir = tmp_path / "hf"
    run_module("checkpoints_tools.to_hf", "--checkpoint", root, "--output", out_dir, "--dtype", "fp32", "--no-progress",
               check=True)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    blend = json.loads((sft_data / "sft" / "blend.json").read_text())
    assert config.get("chat_template") == blend["chat_template"] or (out_dir / "chat_template.jinja").read_text() == \
        blend["chat_template"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What does os.path.join do?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "<|assistant|>" in tok.decode(prompt["input_ids"][0])  # the template the model was trained with
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id)
    prompt_ids = prompt["input_ids"][0].tolist()
    theirs = generated[0, len(prompt_ids):].tolist()
    reply = tok.decode(theirs, skip_special_tokens=True)
    assert theirs and reply.strip(), reply
    # the same greedy reply from the checkpoint itself, run by megafox: the export is the model trained
    ours = run_distributed("tests/support/checkpoint_model.py:greedy_tokens", 1, {}, {
        "root": str(root), "prompt": prompt_ids, "max_new_tokens": 24, "eos_id": tok.eos_token_id})
    assert theirs == ours, (tok.decode(theirs), tok.decode(ours))
