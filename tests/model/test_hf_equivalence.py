"""megafox's model equals HF transformers' Llama on the same weights, and the mapping round-trips."""
import pytest
import torch

from megafox.testing.distributed import run_distributed


@pytest.mark.parametrize("impl", ["local", "native"])
def test_logits_equal_transformers_and_mapping_round_trips(impl):
    out = run_distributed("tests/model/bodies.py:logits_vs_hf", 1, kwargs={"impl": impl})
    assert out["padded_vocab"] == 1024  # vocab 1000 padded to a multiple of 128
    torch.testing.assert_close(out["ours"], out["theirs"], rtol=0, atol=1e-5)
    assert torch.count_nonzero(out["padding_logits"]) == 0  # zero rows for the padded vocab
    assert set(out["back"]) == set(out["expected"])
    for name, tensor in out["expected"].items():
        assert torch.equal(out["back"][name], tensor), name


def test_untied_head_equals_transformers():
    out = run_distributed("tests/model/bodies.py:logits_vs_hf", 1, kwargs={"impl": "native", "untied": True})
    torch.testing.assert_close(out["ours"], out["theirs"], rtol=0, atol=1e-5)
    assert "lm_head.weight" in out["back"]
    for name, tensor in out["expected"].items():
        assert torch.equal(out["back"][name], tensor), name


def test_fox1_1p6b_on_meta_has_hf_parameter_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megafox.config import fox1_1p6b
    from megafox.info import parameter_count
    from megafox.model.hf_mapping import hf_config_dict

    cfg = {k: v for k, v in hf_config_dict(fox1_1p6b()).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf_count = sum(p.numel() for p in hf.parameters())  # tied head counted once
    ours = run_distributed("tests/model/bodies.py:meta_parameter_count", 1)
    assert hf_count == 1_665_271_808
    assert ours == hf_count
    assert parameter_count(fox1_1p6b()) == hf_count
