"""megafox's model equals HF transformers' Llama on the same weights, and the mapping round-trips."""
import pytest
import torch

from megafox.config import fox1_1p6b, fox1_tiny
from megafox.info import parameter_count
from megafox.model.hf_adapter import (LOCAL_LAYER, MCORE_EMBEDDING, MCORE_LAYER_PREFIX, TE_LAYER, local_to_te_names,
                                      megatron_global_shapes, megatron_layer_shapes)
from megafox.model.hf_mapping import Layout, hf_config_dict, hf_to_megatron, megatron_to_hf
from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state


@pytest.mark.parametrize("impl", ["local", "native"])
def test_logits_equal_transformers_and_mapping_round_trips(impl):
    out = run_distributed("tests/model/bodies.py:logits_vs_hf", 1, kwargs={"impl": impl})
    assert out["padded_vocab"] == 1024  # vocab 1000 padded to a multiple of 128
    torch.testing.assert_close(out["ours"], out["theirs"], rtol=0, atol=1e-5)
    # the padded rows are out of every softmax: their logits leave the model as -inf
    assert bool((out["padding_logits"] == float("-inf")).all())
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

    cfg = {k: v for k, v in hf_config_dict(fox1_1p6b()).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf_count = sum(p.numel() for p in hf.parameters())  # tied head counted once
    ours = run_distributed("tests/model/bodies.py:meta_parameter_count", 1)
    assert hf_count == 1_665_271_808
    assert ours == hf_count
    assert parameter_count(fox1_1p6b()) == hf_count


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 1), (2, 1, 2)], ids=["tp1", "tp2pp2", "tp2vpp2"])
def test_te_names_round_trip_and_differ_only_in_the_norms(layout):
    """hf -> megatron with TE names -> hf is the identity, and the TE-named rank dicts are the
    local-named ones with exactly the two fused norms renamed (same tensors)."""
    model, lay = fox1_tiny(), Layout(*layout)
    hf = hf_state(model, seed=3)
    te = hf_to_megatron(hf, model, lay, te_names=True)
    local = hf_to_megatron(hf, model, lay, te_names=False)
    back = megatron_to_hf(te, model, lay, te_names=True)
    assert set(back) == set(hf) - {"lm_head.weight"}  # tied
    for name, tensor in back.items():
        assert torch.equal(tensor, hf[name]), name

    rename = local_to_te_names()
    assert len(rename) == 2
    for key in local:
        renamed = {}
        for name, tensor in local[key].items():
            for old, new in rename.items():
                if name.endswith("." + old):
                    name = name[: -len(old)] + new
            renamed[name] = tensor
        assert set(renamed) == set(te[key])
        for name, tensor in renamed.items():
            assert torch.equal(tensor, te[key][name]), name


def test_adapter_te_names_are_megatron_cores_saving_map():
    """The local spec saves its norms under TE's names through `sharded_state_dict_keys_map`;
    applying that map (megatron-core's own prefix rewrite) to the adapter's local names must give
    the adapter's TE names."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    mapped = []
    for name in LOCAL_LAYER.all():
        hits = [(old, new) for old, new in keys_map.items() if name.startswith(old)]
        mapped.append(hits[0][1] + name[len(hits[0][0]):] if hits else name)
    assert tuple(mapped) == TE_LAYER.all()
    assert TE_LAYER != LOCAL_LAYER


@pytest.mark.multirank
@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_adapter_names_and_shapes_are_what_megatron_core_builds_and_saves(untied):
    """At TP2: the module's parameter names are the adapter's local names; every ShardedTensor
    megatron-core saves has the adapter's TE name, global (stacked, padded) shape and per-rank shape."""
    out = run_distributed("tests/model/bodies.py:sharded_names_and_shapes", 2, {"tensor_model_parallel_size": 2},
                          {"untied": untied})
    model = fox1_tiny()
    model.tie_word_embeddings = not untied
    assert out["layer0"] == sorted(LOCAL_LAYER.all())
    expected = megatron_global_shapes(model, te_names=True, padded_vocab=out["padded_vocab"])
    assert {k: v["global"] for k, v in out["saved"].items()} == expected
    per_rank = megatron_layer_shapes(model, te_names=True, tp=2)
    for name, shape in per_rank.items():
        assert out["saved"][MCORE_LAYER_PREFIX + name]["local"] == shape, name
    assert out["saved"][MCORE_EMBEDDING]["local"] == (out["padded_vocab"] // 2, model.hidden_size)
