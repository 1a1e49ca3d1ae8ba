"""HF -> megafox -> HF is exact; the megafox checkpoint loads at other layouts; sharding; reshard."""
import json

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.checkpoints_tools.ckpt_tools_helpers import run_tool, save_hf_dir, tiny


def _load_dir(path):
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    out = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(str(path / name)))
    return out


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    src = save_hf_dir(tiny(tie=True), tmp / "src", seed=2)
    proc = run_tool("from_hf", "--hf", src, "--output", tmp / "ckpt", "--tp", 2, "--pp", 2, "--verify",
                    "--tolerance", "1e-5")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    return {"src": src, "ckpt": tmp / "ckpt", "tmp": tmp}


def test_hf_megafox_hf_identical(round_trip):
    out = round_trip["tmp"] / "back"
    proc = run_tool("to_hf", "--checkpoint", round_trip["ckpt"], "--output", out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    src, back = _load_dir(round_trip["src"]), _load_dir(out)
    assert set(back) == set(src) - {"lm_head.weight"}  # tied: the head is the embedding
    for name in back:
        assert torch.equal(back[name], src[name]), name
    a, b = (json.loads((d / "config.json").read_text()) for d in (round_trip["src"], out))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert a[key] == b[key], key
    assert a["rope_parameters"]["rope_theta"] == b["rope_theta"] == 10000.0  # transformers 5 vs 4.x spelling
    meta = json.loads((round_trip["ckpt"] / "iter_0000000" / "megafox.json").read_text())
    assert meta["kind"] == "model-only" and meta["iteration"] == 0 and meta["run_state"] is None
    assert meta["layout"] == {"tp": 2, "pp": 2, "vpp": 1, "dp": None, "world": None}
    assert meta["model"]["num_query_groups"] == 2 and meta["model"]["vocab_size"] == 1000


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_trainer_loads_converted_checkpoint_at_other_layouts(round_trip, layout):
    got = run_distributed("tests/checkpoints_tools/bodies.py:load_and_gather", 2, layout,
                          {"root": str(round_trip["ckpt"])})
    src = _load_dir(round_trip["src"])
    assert got["iteration"] == 0
    assert set(got["weights"]) == set(src)
    for name, tensor in src.items():
        assert torch.equal(got["weights"][name], tensor), name


def test_untied_bf16_release_round_trip_and_sharding(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_hf_dir(tiny(tie=False), tmp_path / "src", seed=4, dtype=torch.bfloat16)
    assert run_tool("from_hf", "--hf", src, "--output", tmp_path / "ckpt", "--no-progress").returncode == 0
    out = tmp_path / "back"
    proc = run_tool("to_hf", "--checkpoint", tmp_path / "ckpt", "--output", out, "--dtype", "bf16",
                    "--max-shard-size", "100KB", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    for f in files:  # within the limit, or a single tensor bigger than it (the 128 KB embedding)
        members = [n for n, v in index["weight_map"].items() if v == f]
        assert (out / f).stat().st_size <= 100_000 + 4096 or len(members) == 1, (f, members)
    assert not (out / "model.safetensors").exists()
    src_sd, back = _load_dir(src), _load_dir(out)
    assert set(back) == set(src_sd) and "lm_head.weight" in back
    for name in back:
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], src_sd[name]), name
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert torch.equal(hf.lm_head.weight, src_sd["lm_head.weight"])
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)


def test_reshard_repads_vocab_only_when_needed(tmp_path):
    model = tiny(tie=True, vocab_size=1100)  # padded 1152 for TP1, 1280 for TP2
    src = save_hf_dir(model, tmp_path / "src", seed=6)
    assert run_tool("from_hf", "--hf", src, "--output", tmp_path / "tp1", "--no-progress").returncode == 0

    same = run_tool("reshard", "--checkpoint", tmp_path / "tp1", "--tp", 1, "--pp", 2)
    assert same.returncode == 0 and "nothing to write" in same.stdout
    proc = run_tool("reshard", "--checkpoint", tmp_path / "tp1", "--tp", 2, "--pp", 1, "--output", tmp_path / "tp2")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run_tool("inspect", "--checkpoint", tmp_path / "tp2", "--json").stdout)
    assert info["tensors"]["embedding.word_embeddings.weight"]["shape"] == [1280, 64]
    assert info["layout"]["tp"] == 2
    assert run_tool("to_hf", "--checkpoint", tmp_path / "tp2", "--output", tmp_path / "hf", "--dtype", "fp32").returncode == 0
    back, src_sd = _load_dir(tmp_path / "hf"), _load_dir(src)
    for name in back:
        assert torch.equal(back[name], src_sd[name]), name


def test_rope_theta_from_transformers5_config(tmp_path):
    """transformers 5 saves rope_theta inside rope_parameters; it must not fall back to 10000."""
    src = save_hf_dir(tiny(tie=True, rope_theta=500000.0), tmp_path / "src", seed=8)
    assert json.loads((src / "config.json").read_text())["rope_parameters"]["rope_theta"] == 500000.0
    proc = run_tool("from_hf", "--hf", src, "--output", tmp_path / "ckpt", "--verify", "--tolerance", "1e-5",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    meta = json.loads((tmp_path / "ckpt" / "iter_0000000" / "megafox.json").read_text())
    assert meta["model"]["rope_theta"] == 500000.0
