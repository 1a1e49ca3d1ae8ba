"""A tiny model trained at TP2/PP2 -> HF: transformers' logits equal megafox's; GQA, tied and untied."""
import dataclasses
import json

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state
from tests.checkpoints_tools.ckpt_tools_helpers import run_tool, save_hf_dir, tiny

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TP2PP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}


@pytest.fixture(scope="module", params=["tied", "untied"])
def trained(request, tmp_path_factory):
    """fox1-tiny (GQA 4 heads : 2 KV groups) trained 2 steps on 4 ranks at TP2 x PP2, then saved."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = tiny(tie=request.param == "tied")
    torch.save(hf_state(model, seed=5), tmp / "init.pt")
    weights = run_distributed("tests/checkpoints_tools/bodies.py:train_and_save", 4, TP2PP2,
                              {"model": dataclasses.asdict(model), "hf_path": str(tmp / "init.pt"),
                               "root": str(tmp / "ckpt")})
    return {"model": model, "root": tmp / "ckpt", "weights": weights, "tmp": tmp, "init": torch.load(tmp / "init.pt")}


def test_export_equals_trained_weights_and_logits(trained, sp_models):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, out = trained["model"], trained["tmp"] / "hf"
    proc = run_tool("to_hf", "--checkpoint", trained["root"], "--output", out, "--dtype", "fp32",
                    "--tokenizer", sp_models["fox"], "--verify", "--tolerance", "1e-5")
    assert proc.returncode == 0, proc.stderr
    assert "verify: max |logit" in proc.stdout and "OK" in proc.stdout

    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(trained["weights"])
    assert ("lm_head.weight" in exported) == (not model.tie_word_embeddings)
    for name, tensor in trained["weights"].items():
        assert torch.equal(exported[name], tensor), name  # exact: same fp32 values as mcore's own load
    moved = [n for n in exported if not torch.equal(exported[n], trained["init"][n])]
    assert len(moved) == len(exported)  # training changed every tensor, so a stale copy would show

    ids = torch.randint(0, model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(ids, trained["tmp"] / "ids.pt")
    ours = run_distributed("tests/checkpoints_tools/bodies.py:checkpoint_logits", 1, {},
                           {"root": str(trained["root"]), "ids_path": str(trained["tmp"] / "ids.pt"),
                            "padded_rows": model.padded_vocab_size(2)})
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.tie_word_embeddings
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["torch_dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.eos_token_id == config["eos_token_id"] == 2


def test_bf16_export_and_inspect(trained):
    from safetensors import safe_open

    out = trained["tmp"] / "hf_bf16"
    proc = run_tool("to_hf", "--checkpoint", trained["root"], "--iteration", "2", "--output", out, "--no-progress",
                    "--verify")
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.3.self_attn.k_proj.weight"
        got = f.get_tensor(name)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, trained["weights"][name].to(torch.bfloat16))

    info = run_tool("inspect", "--checkpoint", trained["root"], "--json")
    assert info.returncode == 0, info.stderr
    s = json.loads(info.stdout)
    assert (s["iteration"], s["stage"], s["consumed_tokens"]) == (2, "stage1", 64)
    assert s["layout"] == {"tp": 2, "pp": 2, "vpp": 1, "dp": 1, "world": 4}  # recorded by the save itself
    assert s["tensors"]["decoder.layers.self_attention.linear_qkv.weight"]["shape"] == [4, (4 + 2 * 2) * 16, 64]
    assert ("output_layer.weight" in s["tensors"]) == (not trained["model"].tie_word_embeddings)


def test_verify_checks_the_exported_iteration_not_latest(trained, tmp_path):
    """--iteration 2 --verify while a different model is `latest`: the check compares HF with
    iteration 2 (the weights exported), so it passes; comparing with latest would fail."""
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(trained["root"], root)
    other = save_hf_dir(trained["model"], tmp_path / "other", seed=99)
    proc = run_tool("from_hf", "--hf", other, "--output", root, "--iteration", "7", "--tp", 1, "--pp", 1, "--no-progress",
                    "--force")  # root holds the training run
    assert proc.returncode == 0, proc.stderr
    from megafox.checkpoint.layout import read_metadata
    assert read_metadata(root)["iteration"] == 7  # the other model is latest
    proc = run_tool("to_hf", "--checkpoint", root, "--iteration", "2", "--output", tmp_path / "hf", "--dtype", "fp32",
                    "--no-progress", "--verify", "--tolerance", "1e-5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
