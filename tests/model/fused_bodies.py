"""Rank bodies for the fused-loss and recompute tests (run by tests.support.distributed)."""
import dataclasses

import torch
from megatron.core import parallel_state as ps

from megafox.config import BuildConfig, OptimizerConfig, fox1_tiny
from megafox.model.build import build_model
from megafox.model.gpt import FoxGPTModel
from tests.support.hf_reference import hf_llama
from tests.support.layout import current_parallel, gather_hf_weights, load_hf_weights
from megafox.training.stack import build_training_stack
from megafox.training.step import train_step


def _setup(sequence_parallel):
    model = fox1_tiny()
    model.transformer_impl = "native"
    parallel = dataclasses.replace(current_parallel(), sequence_parallel=sequence_parallel)
    return model, parallel


def _build(model, parallel, hf, **options):
    chunks = build_model(model, parallel, BuildConfig(**options))
    load_hf_weights(chunks, hf, model, parallel)
    return chunks[0]


def _padded_rows(net, model, name):
    """This rank's rows of the (tied) embedding / output weight past the real vocabulary."""
    local = net.embedding.word_embeddings.weight.shape[0]
    start = ps.get_tensor_model_parallel_rank() * local
    return slice(max(model.vocab_size - start, 0), local) if "word_embeddings" in name or "output_layer" in name else None


def grads(hf_path, batch_path, sequence_parallel=False, loss_chunk_tokens=5):
    """Per-token losses and every local gradient: unfused vs fused (recomputing) vs fused with
    loss_mask (precomputed grads). Returns max |difference| over all ranks and the scale, each
    path's max |loss difference| from transformers' LlamaForCausalLM (the vocabulary's real rows
    only: fox1-tiny's 1000 tokens are padded to 1024) and the largest gradient any padded row got."""
    import torch.nn.functional as F

    model, parallel = _setup(sequence_parallel)
    hf, batch = torch.load(hf_path), torch.load(batch_path)
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    reference = hf_llama(model)
    reference.load_state_dict(hf)
    with torch.no_grad():
        logits = reference(input_ids=tokens).logits.float()
        hf_losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                    reduction="none").view_as(mask)
    padded_grad = 0.0

    def run(fused, pass_mask):
        net = _build(model, parallel, hf, fused_loss=fused, loss_chunk_tokens=loss_chunk_tokens)
        kwargs = {"loss_mask": mask} if pass_mask else {}
        losses = net(tokens, pos, None, labels=labels, **kwargs)
        (losses * mask).sum().mul(0.5).backward()
        nonlocal padded_grad
        for n, p in net.named_parameters():
            rows = _padded_rows(net, model, n)
            if rows is not None and rows.start < rows.stop:
                padded_grad = max(padded_grad, p.grad[rows].abs().max().item())
        return losses.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    ref_losses, ref_grads = run(False, False)
    out = {"loss_shape": tuple(ref_losses.shape), "grad_scale": max(g.abs().max().item() for g in ref_grads.values())}
    hf_diff = {"unfused": (ref_losses - hf_losses).abs().max().item()}
    for name, (fused, pass_mask) in {"recompute": (True, False), "precompute": (True, True)}.items():
        losses, got = run(fused, pass_mask)
        assert set(got) == set(ref_grads)
        hf_diff[name] = (losses - hf_losses).abs().max().item()
        diff = torch.tensor([(losses - ref_losses).abs().max().item(),
                             max((got[n] - ref_grads[n]).abs().max().item() for n in ref_grads)])
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        out[name] = {"loss_diff": diff[0].item(), "grad_diff": diff[1].item()}
    maxima = torch.tensor([padded_grad, *hf_diff.values()])
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    out["padded_grad"], out["hf_loss_diff"] = maxima[0].item(), dict(zip(hf_diff, maxima[1:].tolist()))
    return out


def train(hf_path, batch_path, micro_batch_size, variants, sequence_parallel=False):
    """One optimizer step from the same weights per variant (a dict of BuildConfig fields)."""
    model, parallel = _setup(sequence_parallel)
    hf, batch = torch.load(hf_path), torch.load(batch_path)
    from torch._dynamo.utils import counters

    results = []
    for options in variants:
        graphs_before = counters["stats"]["unique_graphs"]
        # eps = 1 keeps Adam's first step linear in the grads (see tests/parallel/bodies.py)
        stack = build_training_stack(model, parallel, BuildConfig(**options),
                                     OptimizerConfig(lr=0.5, eps=1.0, weight_decay=0.01),
                                     load_weights=lambda chunks: load_hf_weights(chunks, hf, model, parallel))
        ddp, optimizer = stack.model, stack.optimizer
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        local = {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}
        n_micro = local["tokens"].shape[0] // micro_batch_size
        micro = [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in local.items()}
                 for i in range(n_micro)]
        result = train_step(ddp, optimizer, iter(micro), n_micro, batch["tokens"].shape[1], micro_batch_size)
        results.append({"loss": result.loss, "grad_norm": result.grad_norm,
                        "weights": gather_hf_weights(ddp, model, parallel),
                        "compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before})
    return results


def heads(seq=12, batch=2, hidden=8, vocab=64, kernels=("eager",), reals=(None,)):
    """`sp_head` for each of (sequence_parallel, pass_mask, loss kernel, real vocabulary)."""
    return {(sp, m, k, r): sp_head(sp, m, seq, batch, hidden, vocab, k, r)
            for sp in (False, True) for m in (False, True) for k in kernels for r in reals}


def sp_head(sequence_parallel, pass_mask, seq, batch, hidden, vocab, kernel="eager", real=None):
    """FoxGPTModel's fused head on this rank's shards vs a full single-device reference.

    The native spec has no sequence-parallel norm, so the SP path of the head is driven directly
    with a stand-in model object holding just what `_fused_loss` reads. `real` < vocab: the rows
    past it are padding; the reference is a softmax over the first `real` rows only, and the
    padded rows must get a zero gradient (reported as a fourth "diff")."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(3)
    h_full = torch.randn(seq, batch, hidden, generator=g, requires_grad=True)
    w_full = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    real = real or vocab
    labels = torch.randint(0, real, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.25).float()
    ref = F.cross_entropy(torch.einsum("sbh,vh->bsv", h_full, w_full[:real]).reshape(-1, real),
                          labels.reshape(-1), reduction="none").view(batch, seq)
    (ref * mask).sum().backward()

    v_local = vocab // tp
    s_local, s_rank = (seq // tp, rank) if sequence_parallel else (seq, 0)
    rows = slice(s_rank * s_local, (s_rank + 1) * s_local)
    h = h_full.detach()[rows].clone().requires_grad_()
    w = w_full.detach()[rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    output_layer = torch.nn.Module()  # a module: _fused_loss runs its forward pre-hooks
    output_layer.weight = w
    stand_in = SimpleNamespace(
        config=SimpleNamespace(sequence_parallel=sequence_parallel),
        pg_collection=SimpleNamespace(tp=ps.get_tensor_model_parallel_group()),
        share_embeddings_and_output_weights=False, output_layer=output_layer,
        loss_chunk_tokens=5, loss_kernel=kernel, real_vocab_size=real if real < vocab else None)
    losses = FoxGPTModel._fused_loss(stand_in, h, labels, mask if pass_mask else None)
    (losses * mask).sum().backward()
    diff = torch.tensor([
        (losses - ref.detach()).abs().max().item(),
        (h.grad - h_full.grad[rows]).abs().max().item(),
        (w.grad - w_full.grad[rank * v_local:(rank + 1) * v_local]).abs().max().item(),
        w.grad[max(real - rank * v_local, 0):].abs().max().item() if real < (rank + 1) * v_local else 0.0])
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return {"shape": tuple(losses.shape), "diff": diff.tolist()}


def native_vs_local(hf_path, batch_path):
    """Logits of the native (SDPA) and local specs and of HF Llama, same weights, on the device
    this machine has (CUDA when present: flash/cuDNN/efficient SDPA kernels)."""
    model = fox1_tiny()
    parallel = current_parallel()
    cuda = torch.cuda.is_available()
    hf, batch = torch.load(hf_path), torch.load(batch_path)
    tokens = batch["tokens"].cuda() if cuda else batch["tokens"]
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = {}
    for impl in ("native", "local"):
        model.transformer_impl = impl
        net = _build(model, parallel, hf)
        if cuda:
            net = net.cuda()
        mask = None
        if impl == "local":  # megatron-core's local attention takes an explicit causal mask
            s = tokens.shape[1]
            mask = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril().logical_not().view(1, 1, s, s)
        with torch.no_grad():
            logits[impl] = net(tokens, pos, mask).float().cpu()[..., :model.vocab_size]
    ref = hf_llama(model)
    ref.load_state_dict(hf)
    if cuda:
        ref = ref.cuda()
    with torch.no_grad():
        logits["hf"] = ref(input_ids=tokens).logits.float().cpu()
    return {"device": "cuda" if cuda else "cpu", "logits": logits}
