"""Packed conversations (SFT): attention never crosses a conversation, positions restart, and a
packed micro-batch trains exactly like its conversations run one by one.

References: each conversation run alone through the same model (batch of one, no padding), HF
transformers' LlamaForCausalLM on each conversation, and TP1 for the parallel layouts."""
import types

import pytest
import torch

from megafox.config import ConfigError, fox1_tiny
from megafox.model.attention import SDPAttention, packed_seq_params
from megafox.model.specs import layer_spec, require_packed_support
from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state
from tests.support.compare import assert_same_step
from tests.support.indexed import synthetic_conversations, write_sft_blend, write_sft_dataset
from tests.support.text import stdlib_texts
from tests.support.tokenizers import train_sentencepiece

# 5 conversations of different lengths in 2 rows of 32: [18, 13] + 1 pad, [11, 7, 5] + 9 pad
LENGTHS, ROWS, SEQ = [7, 13, 18, 5, 11], [[2, 1], [4, 0, 3]], 32


@pytest.fixture(scope="module")
def single_rank():
    kw = dict(lengths=LENGTHS, rows=ROWS, seq=SEQ)
    return run_distributed("tests/model/packed_bodies.py:single_rank_checks", 1, kwargs=kw)


@pytest.mark.parametrize("run", ["equivalence", "equivalence_fused_loss"])
def test_packed_loss_and_grads_equal_each_conversation_alone(single_rank, run):
    packed, alone = single_rank[run]["packed"], single_rank[run]["alone"]
    assert packed["tokens"] == alone["tokens"] > 0
    assert packed["loss"] == pytest.approx(alone["loss"], rel=1e-5, abs=1e-5)
    assert set(packed["grads"]) == set(alone["grads"]) and len(alone["grads"]) > 10  # every parameter
    for name, want in alone["grads"].items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(packed["grads"][name], want, rtol=1e-5, atol=1e-5, msg=name)
    # the same rows without cu_seqlens (attention across conversations, positions running on)
    # train on something else: the comparison above can fail
    assert abs(single_rank[run]["unpacked_loss"] - alone["loss"]) > 1e-3


def test_packed_logits_equal_alone_and_transformers(single_rank):
    logits = single_rank["logits"]
    assert [len(x["packed"]) for x in logits] == [LENGTHS[i] for row in ROWS for i in row]
    for x in logits:
        torch.testing.assert_close(x["packed"], x["alone"], rtol=0, atol=1e-5)
        torch.testing.assert_close(x["packed"], x["hf"], rtol=0, atol=1e-5)


def test_forward_step_without_cu_seqlens_is_the_pretraining_call(single_rank):
    out = single_rank["unchanged"]
    assert torch.equal(out["forward_step"], out["direct"])


def test_pipeline_stage_given_the_pretraining_shape_fails_with_one_clear_error(single_rank):
    message = single_rank["shape_error"]
    assert message and "SFTData.pipeline_shape" in message and f"[{len(ROWS) * SEQ}, 1, hidden]" in message


# --------------------------------------------------------------------------------- the kernels
def _attention(kernel, heads=4, groups=2, dim=16):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=dim, attention_dropout=0.0,
                               use_cpu_initialization=True)
    single_tp = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    return SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=single_tp, packed_kernel=kernel)


def _qkv(lengths, heads=4, groups=2, dim=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    return [torch.randn(t, n, dim, generator=g).to(device, dtype).requires_grad_() for n in (heads, groups, groups)]


def _reference(q, k, v, lengths, scale):
    """Softmax attention written out per segment: causal, K/V heads repeated for GQA."""
    out, at = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = q[at:at + n], k[at:at + n].repeat_interleave(rep, 1), v[at:at + n].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        at += n
    return torch.cat(out).reshape(q.shape[0], -1)


@pytest.mark.parametrize("kernel", ["segments", "mask"])
def test_packed_kernels_equal_per_segment_softmax_attention(kernel):
    lengths = [5, 1, 12, 7, 3]  # a one-token segment too
    cu = torch.tensor([0, 5, 6, 18, 25, 28], dtype=torch.int32)
    attention = _attention(kernel)
    q, k, v = _qkv(lengths)
    got = attention(q, k, v, None, packed_seq_params=packed_seq_params(cu, 12))
    want = _reference(q, k, v, lengths, attention.softmax_scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen runs flash attention: CUDA only")
def test_varlen_kernel_matches_segments_on_gpu():
    lengths = [100, 3, 700, 221]
    cu = torch.tensor([0, 100, 103, 803, 1024], dtype=torch.int32)
    q, k, v = _qkv(lengths, heads=16, groups=4, dim=128, dtype=torch.bfloat16, device="cuda")
    exact = _reference(*(x.detach().double() for x in (q, k, v)), lengths, 128 ** -0.5)
    errors = {}
    for kernel in ("varlen", "segments"):
        out = _attention(kernel, 16, 4, 128).cuda()(q, k, v, None, packed_seq_params=packed_seq_params(cu, 700, "cuda"))
        errors[kernel] = (out.double() - exact).abs().max().item()
    assert errors["varlen"] <= 2 * errors["segments"] + 1e-3, errors


def test_varlen_kernel_is_refused_where_it_cannot_run(monkeypatch):
    # a machine without CUDA, on any machine (a GPU one would otherwise build the kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        _attention("varlen")


def test_local_spec_refuses_packed_sequences_at_config_time():
    with pytest.raises(ConfigError, match="model.transformer_impl: 'local'"):
        require_packed_support("local")
    require_packed_support("native")
    with pytest.raises(ConfigError, match="packed_attention"):
        layer_spec("native", packed_attention="flash")
    spec = layer_spec("native", packed_attention="mask")
    assert spec.submodules.self_attention.submodules.core_attention.params == {"packed_kernel": "mask"}


# --------------------------------------------------------------------------------- layouts
@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_layouts")
    tok = str(train_sentencepiece(root / "tok", stdlib_texts(["json/*.py"]), 1000))
    convs, masks = synthetic_conversations(60, 3, 40, 1000, seed=8)
    prefix = write_sft_dataset(str(root / "data" / "chat"), convs, masks)
    blend = write_sft_blend(str(root / "data" / "blend.json"), tok, [(prefix, 1.0)], 64)
    torch.save(hf_state(fox1_tiny(), seed=3), root / "hf.pt")
    return {"hf_path": str(root / "hf.pt"), "blend": blend, "cache_dir": str(root / "cache"), "seq": 64,
            "global_batch_size": 8}


def _sft_step(inputs, nproc, layout, micro_batch_size, name):
    # a cache of its own per run: the ranks build the packing plan together (rank 0 first) every time
    kwargs = dict(inputs, micro_batch_size=micro_batch_size, cache_dir=f"{inputs['cache_dir']}_{name}")
    return run_distributed("tests/model/packed_bodies.py:sft_one_step", nproc, layout, kwargs)


@pytest.fixture(scope="module")
def sft_reference(sft_inputs):
    return _sft_step(sft_inputs, 1, {}, 2, "reference")


@pytest.mark.multirank
@pytest.mark.parametrize("name,nproc,layout,mbs", [
    ("tp1_mbs1", 1, {}, 1),  # four micro-batches instead of one: the same per-token mean
    ("tp2", 2, {"tensor_model_parallel_size": 2}, 2),
    ("pp2", 2, {"pipeline_model_parallel_size": 2}, 2),  # packed rows cross stages as [2 x 64, 1, h]
    ("dp2", 2, {}, 2),
])
def test_sft_step_at_layout_equals_tp1(sft_reference, sft_inputs, name, nproc, layout, mbs):
    got = _sft_step(sft_inputs, nproc, layout, mbs, name)
    assert got["tokens"] > 0 and not got["skipped"]
    assert_same_step(sft_reference, got, torch.load(sft_inputs["hf_path"]))
    if name == "dp2":  # rank 0 read its half of the global batch
        assert got["samples"] == [0, 1, 4, 5]
