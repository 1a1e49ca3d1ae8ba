"""Bad input: one line on stderr naming the file/field, exit code 2, never a traceback."""
import json
import shutil

import pytest

from tests.checkpoints_tools.ckpt_tools_helpers import run_tool, save_hf_dir, tiny
from tests.support.processes import assert_one_line_error


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    save_hf_dir(tiny(tie=True), tmp / "hf", seed=1)
    proc = run_tool("from_hf", "--hf", tmp / "hf", "--output", tmp / "ckpt", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return tmp


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    assert_one_line_error(run_tool("to_hf", "--checkpoint", tmp_path / "junk", "--output", tmp_path / "o"),
                          str(tmp_path / "junk"), "not a megafox checkpoint")
    assert_one_line_error(run_tool("inspect", "--checkpoint", tmp_path / "nope"), "not found")


def test_incomplete_save_without_metadata(good, tmp_path):
    ckpt = _copy(good / "ckpt", tmp_path / "ckpt")
    (ckpt / "iter_0000000" / "megafox.json").unlink()
    assert_one_line_error(run_tool("to_hf", "--checkpoint", ckpt, "--output", tmp_path / "o"), "megafox.json")


def test_missing_shard(good, tmp_path):
    ckpt = _copy(good / "ckpt", tmp_path / "ckpt")
    shard = sorted((ckpt / "iter_0000000").glob("*.distcp"))[0]
    shard.unlink()
    line = assert_one_line_error(run_tool("to_hf", "--checkpoint", ckpt, "--output", tmp_path / "o"),
                                 "missing shard", shard.name)
    assert not (tmp_path / "o" / "model.safetensors").exists(), line


def test_truncated_shard(good, tmp_path):
    ckpt = _copy(good / "ckpt", tmp_path / "ckpt")
    shard = sorted((ckpt / "iter_0000000").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert_one_line_error(run_tool("inspect", "--checkpoint", ckpt), "truncated", shard.name)


def test_config_tensor_shape_mismatch(good, tmp_path):
    ckpt = _copy(good / "ckpt", tmp_path / "ckpt")
    meta_file = ckpt / "iter_0000000" / "megafox.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["ffn_hidden_size"] = 256
    meta_file.write_text(json.dumps(meta))
    assert_one_line_error(run_tool("to_hf", "--checkpoint", ckpt, "--output", tmp_path / "o"),
                          "linear_fc1.weight", "[4, 512, 64]", "mismatch")


def test_missing_model_config_in_metadata(good, tmp_path):
    ckpt = _copy(good / "ckpt", tmp_path / "ckpt")
    meta_file = ckpt / "iter_0000000" / "megafox.json"
    meta = json.loads(meta_file.read_text())
    del meta["model"]
    meta_file.write_text(json.dumps(meta))
    assert_one_line_error(run_tool("to_hf", "--checkpoint", ckpt, "--output", tmp_path / "o"), "'model'", "megafox.json")


def test_hf_not_llama(good, tmp_path):
    hf = _copy(good / "hf", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (hf / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_tool("from_hf", "--hf", hf, "--output", tmp_path / "o"),
                          "config.json", "not a Llama-compatible model", "gpt2")


def test_hf_scaled_rope_rejected(good, tmp_path):
    hf = _copy(good / "hf", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_tool("from_hf", "--hf", hf, "--output", tmp_path / "o"), "rope_scaling")


def test_hf_missing_and_misshapen_tensors(good, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    hf = _copy(good / "hf", tmp_path / "hf")
    sd = load_file(str(hf / "model.safetensors"))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(run_tool("from_hf", "--hf", hf, "--output", tmp_path / "o"),
                          "missing tensor model.layers.2.mlp.up_proj.weight")
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(run_tool("from_hf", "--hf", hf, "--output", tmp_path / "o"),
                          "model.layers.2.mlp.up_proj.weight", "[64, 64]", "[128, 64]")


def test_hf_dir_without_weights_or_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_tool("from_hf", "--hf", tmp_path / "empty", "--output", tmp_path / "o"), "config.json")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(run_tool("from_hf", "--hf", tmp_path / "empty", "--output", tmp_path / "o"),
                          "config.json", "missing field")


def test_bad_layout_and_tokenizer(good, tmp_path):
    assert_one_line_error(run_tool("from_hf", "--hf", good / "hf", "--output", tmp_path / "o", "--tp", 3),
                          "--tp", "divisible")
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    assert_one_line_error(run_tool("to_hf", "--checkpoint", good / "ckpt", "--output", tmp_path / "o",
                                   "--tokenizer", tmp_path / "bad.model"), "bad.model", "SentencePiece")


def test_verify_failure_exits_1(good, tmp_path):
    proc = run_tool("to_hf", "--checkpoint", good / "ckpt", "--output", tmp_path / "o", "--dtype", "fp32",
                    "--verify", "--tolerance", "-1", "--no-progress")
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("argv, given", [([], "no command given"), (["frob", "--checkpoint", "x"], "unknown command 'frob'")])
def test_megafox_ckpt_without_a_known_command(argv, given):
    """`megafox-ckpt` (checkpoints_tools.cli:main) with no or an unknown command: one line naming
    what was given and the commands there are, exit 2."""
    line = assert_one_line_error(run_tool("cli", *argv), f"megafox-ckpt: error: {given} (choose from: ")
    assert "inspect, verify, reshard, to-hf, from-hf" in line
    helped = run_tool("cli", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: megafox-ckpt {inspect,") and not helped.stderr
