"""Numerics on whatever device this machine has: CPU in CI, CUDA on a GPU machine
(bench/gpu_check.sh runs this file there), where cuBLAS GEMMs and SDPA's flash / efficient
kernels replace the CPU ones."""
import pytest
import torch
import torch.nn.functional as F

from megafox.config import fox1_tiny
from megafox.model import fused_loss
from megafox.model.attention import SDPAttention
from megafox.model.fused_loss import fused_linear_cross_entropy
from tests.support.distributed import run_distributed
from tests.support.hf_reference import hf_state

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _problem(dtype, n=300, h=64, v=4096):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(DEV, dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).to(DEV, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(DEV)
    mask = (torch.rand(n, generator=g) > 0.2).float().to(DEV)
    return hidden, weight, labels, mask


def _unfused(hidden, weight, labels, mask):
    losses = F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="none")
    return (losses.detach(), *torch.autograd.grad((losses * mask).sum(), (hidden, weight)))


def _fused(hidden, weight, labels, mask, variant, kernel="eager"):
    losses = fused_linear_cross_entropy(hidden, weight, labels, mask if variant == "precompute" else None, 64,
                                        kernel=kernel)
    return (losses.detach(), *torch.autograd.grad((losses * mask).sum(), (hidden, weight)))


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
@pytest.mark.parametrize("variant", ["recompute", "precompute"])
def test_fused_loss_fp32_equals_reference(variant, kernel):
    if DEV.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    inputs = _problem(torch.float32)
    for got, want in zip(_fused(*inputs, variant, kernel), _unfused(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
@pytest.mark.parametrize("variant", ["recompute", "precompute"])
def test_fused_loss_bf16_no_worse_than_unfused(variant, kernel):
    exact = _unfused(*(t.detach().double().requires_grad_() if t.is_floating_point() else t
                       for t in _problem(torch.float32)))
    inputs = _problem(torch.bfloat16)
    fused, unfused = _fused(*inputs, variant, kernel), _unfused(*inputs)
    for name, f, u, e in zip(("loss", "grad hidden", "grad weight"), fused, unfused, exact):
        err_f = (f.double() - e).abs().max().item()
        err_u = (u.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err_f <= 2 * err_u + 1e-2 * scale, (name, err_f, err_u, scale)


@pytest.mark.parametrize("variant", ["recompute", "precompute"])
def test_fused_weight_grad_summed_in_fp32_over_many_chunks(variant, monkeypatch):
    """128 chunks: a bf16 running sum of the weight gradient is ~3x further from the exact one
    than the unfused path's single GEMM; the fp32 sum is as close (added in blocks of 300 rows
    here, the last one partial)."""
    monkeypatch.setattr(fused_loss, "WGRAD_BLOCK_BYTES", 300 * 64 * 2)
    exact = _unfused(*(t.detach().double().requires_grad_() if t.is_floating_point() else t
                       for t in _problem(torch.float32, n=2048, v=2048)))[2]
    inputs = _problem(torch.bfloat16, n=2048, v=2048)
    hidden, weight, labels, mask = inputs
    losses = fused_linear_cross_entropy(hidden, weight, labels, mask if variant == "precompute" else None, 16)
    fused = torch.autograd.grad((losses * mask).sum(), weight)[0]
    assert fused.dtype == torch.bfloat16
    unfused = _unfused(*inputs)[2]
    err_f, err_u = ((g.double() - exact).abs().max().item() for g in (fused, unfused))
    assert err_f <= 1.5 * err_u, (err_f, err_u)


@pytest.mark.multirank
def test_native_and_local_specs_give_hf_logits(tmp_path):
    model = fox1_tiny()
    torch.save(hf_state(model, seed=9), tmp_path / "hf.pt")
    tokens = torch.randint(0, model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.save({"tokens": tokens}, tmp_path / "batch.pt")
    out = run_distributed("tests/model/fused_bodies.py:native_vs_local", 1, {},
                          {"hf_path": str(tmp_path / "hf.pt"), "batch_path": str(tmp_path / "batch.pt")})
    assert out["device"] == DEV.type
    logits = out["logits"]
    assert logits["native"].shape == logits["hf"].shape == (2, 48, model.vocab_size)
    torch.testing.assert_close(logits["native"], logits["local"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["native"], logits["hf"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEV.type != "cuda", reason="CPU SDPA has only the math kernel; run by bench/gpu_check.sh")
def test_native_attention_at_fox1_shapes_runs_on_a_fused_kernel():
    """SDPA silently falls back to the math kernel (an s x s score matrix per head: 4 GB per layer
    at 8K) when no fused kernel takes the call; with only flash and cuDNN allowed, that fallback
    raises instead. Fox-1: causal, 16 query / 4 KV heads, head_dim 128, bf16, 8K tokens."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = SimpleNamespace(context_parallel_size=1, num_attention_heads=16, num_query_groups=4,
                             kv_channels=128, attention_dropout=0.0)
    tp1 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    attn = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp1)
    s = 8192
    q = torch.randn(s, 1, 16, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(s, 1, 4, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = attn(q, k, v, None)
        out.float().sum().backward()
    assert out.shape == (s, 1, 16 * 128)
    assert torch.cuda.max_memory_allocated() < 1 << 30  # no 16 x 8K x 8K scores (4 GiB in fp32)
