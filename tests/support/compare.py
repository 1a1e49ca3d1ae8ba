"""Comparing one optimizer step of two runs (layouts, kernels, recompute variants) weight by weight."""
import pytest
import torch


def assert_same_step(ref, got, before, with_tokens: bool = True):
    """`ref`/`got`: {"loss", "grad_norm", "weights" (HF names)[, "tokens"]} after the same step from
    the same `before` weights. Loss and grad norm to 1e-5; each weight's *update* to 1e-5 of its
    largest element, but never finer than one fp32 ulp of the weights it lands on (another
    reduction order, e.g. a TP all-reduce of a norm's gradient, may round the last bit)."""
    if with_tokens:
        assert got["tokens"] == ref["tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert set(got["weights"]) == set(ref["weights"])
    for name, ref_tensor in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], ref_tensor, rtol=1e-5, atol=1e-6, msg=name)
        ref_update, got_update = ref_tensor - before[name], got["weights"][name] - before[name]
        scale = ref_update.abs().max().item()
        assert scale > 0, f"{name} was not updated"
        ulp = torch.finfo(torch.float32).eps * before[name].abs().max().item()
        torch.testing.assert_close(got_update, ref_update, rtol=1e-5, atol=1e-5 * scale + ulp, msg=name)
