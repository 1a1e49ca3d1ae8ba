"""Bodies of the packed-sequence tests, run under torchrun by tests.support.distributed (not
collected by pytest). Packed batches are built here by hand from the conversations (not by
SFTData) so the model tests do not lean on the loader they are meant to serve."""
import torch
from megatron.core import parallel_state as ps

from megafox.config import OptimizerConfig as OptimizerSettings
from megafox.config import fox1_tiny
from megafox.data.sft_data import SFTData
from megafox.model.attention import packed_seq_params
from megafox.model.build import build_model, transformer_config
from megafox.model.hf_mapping import RankKey, hf_to_megatron, load_rank_state
from megafox.parallel.parallelize import build_optimizer, configure_schedule_hooks, params_gathered, wrap_ddp
from tests.support.hf_reference import hf_llama
from tests.support.layout import current_parallel, gather_hf_weights, load_hf_weights
from megafox.training.step import forward_step, train_step

PAD = 3


def conversations(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    convs = [torch.randint(4, vocab, (n,), generator=g) for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.3).float() for n in lengths]
    return convs, masks


def packed_batch(convs, masks, rows, seq):
    """rows: conversation indices per row; each row = those conversations, then padding."""
    b = len(rows)
    batch = {"tokens": torch.full((b, seq), PAD), "labels": torch.full((b, seq), PAD),
             "loss_mask": torch.zeros(b, seq), "position_ids": torch.zeros(b, seq, dtype=torch.long)}
    cu = [0]
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, n = convs[i], len(convs[i])
            batch["tokens"][r, at:at + n] = ids
            batch["labels"][r, at:at + n - 1] = ids[1:]
            batch["loss_mask"][r, at:at + n - 1] = masks[i][1:]
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
            cu.append(r * seq + at)
        if at < seq:
            batch["position_ids"][r, at:] = torch.arange(seq - at)
            cu.append((r + 1) * seq)
    batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    batch["max_seqlen"] = torch.tensor(max(y - x for x, y in zip(cu, cu[1:])), dtype=torch.int32)
    return batch


def alone_batch(ids, mask):
    """One conversation as a pretraining-style batch of one row: no padding, no cu_seqlens."""
    n = len(ids)
    labels = torch.full((1, n), PAD)
    labels[0, :-1] = ids[1:]
    loss_mask = torch.zeros(1, n)
    loss_mask[0, :-1] = mask[1:]
    return {"tokens": ids[None].clone(), "labels": labels, "loss_mask": loss_mask}


def _tiny_native(seed):
    model = fox1_tiny()
    model.transformer_impl = "native"
    hf = hf_llama(model, seed=seed)
    chunk = build_model(model, current_parallel())[0]
    load_rank_state(chunk, hf_to_megatron(hf.state_dict(), model)[RankKey(0, 0, 0)])
    return model, hf, chunk


def _grads(chunk):
    return {name: p.grad.detach().clone() for name, p in chunk.named_parameters() if p.grad is not None}


def packing_equivalence(lengths, rows, seq, fused_loss=False):
    """Loss and gradients of one packed micro-batch vs every conversation run alone, through
    forward_step and loss_func (the trainer's path), each as the per-token mean over all targets.
    `fused_loss`: the packed run uses the chunked LM-head loss (megafox.model.fused_loss), the
    conversations alone the plain one."""
    model, _, chunk = _tiny_native(seed=21)
    convs, masks = conversations(lengths, model.vocab_size, seed=4)
    chunk.fused_loss, chunk.loss_chunk_tokens = fused_loss, 16  # FoxGPTModel's build-time switches
    output, loss_fn = forward_step(iter([packed_batch(convs, masks, rows, seq)]), chunk)
    loss_sum, tokens, _ = loss_fn(output)
    (loss_sum / tokens).backward()
    packed = {"loss": loss_sum.item() / tokens.item(), "tokens": tokens.item(), "grads": _grads(chunk)}

    chunk.zero_grad(set_to_none=True)
    chunk.fused_loss = False
    total = sum(float(m[1:].sum()) for m in masks)
    loss = 0.0
    for ids, mask in zip(convs, masks):
        output, loss_fn = forward_step(iter([alone_batch(ids, mask)]), chunk)
        part, _, _ = loss_fn(output)
        (part / total).backward()
        loss += part.item() / total
    alone = {"loss": loss, "tokens": int(total), "grads": _grads(chunk)}

    unpacked = packed_batch(convs, masks, rows, seq)  # the same rows as pretraining samples
    del unpacked["cu_seqlens"], unpacked["max_seqlen"], unpacked["position_ids"]
    with torch.no_grad():
        output, loss_fn = forward_step(iter([unpacked]), chunk)
        loss_sum, tokens, _ = loss_fn(output)
    return {"packed": packed, "alone": alone, "unpacked_loss": loss_sum.item() / tokens.item()}


def packed_logits(lengths, rows, seq):
    """Logits of each conversation inside a packed micro-batch, alone, and from transformers."""
    model, hf, chunk = _tiny_native(seed=13)
    chunk.eval()
    convs, masks = conversations(lengths, model.vocab_size, seed=9)
    batch = packed_batch(convs, masks, rows, seq)
    params = packed_seq_params(batch["cu_seqlens"], int(batch["max_seqlen"]))
    out = []
    with torch.no_grad():
        logits = chunk(batch["tokens"].reshape(1, -1), batch["position_ids"].reshape(1, -1), None,
                       packed_seq_params=params)[0, :, :model.vocab_size]
        for r, members in enumerate(rows):
            at = r * seq
            for i in members:
                n = len(convs[i])
                alone = chunk(convs[i][None], torch.arange(n)[None], None)[0, :, :model.vocab_size]
                out.append({"packed": logits[at:at + n], "alone": alone, "hf": hf(convs[i][None]).logits[0]})
                at += n
    return out


def forward_step_unchanged_without_cu_seqlens():
    """A pretraining batch goes through forward_step exactly as model(tokens, positions, None, ...)."""
    model, _, chunk = _tiny_native(seed=2)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.vocab_size, (2, 17), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}
    with torch.no_grad():
        output, _ = forward_step(iter([batch]), chunk)
        direct = chunk(batch["tokens"], torch.arange(16)[None].expand(2, -1), None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"])
    return {"forward_step": output, "direct": direct}


def single_rank_checks(lengths, rows, seq):
    return {"equivalence": packing_equivalence(lengths, rows, seq),
            "equivalence_fused_loss": packing_equivalence(lengths, rows, seq, fused_loss=True),
            "logits": packed_logits(lengths, rows, seq),
            "unchanged": forward_step_unchanged_without_cu_seqlens(),
            "shape_error": pipeline_shape_mismatch(lengths, rows, seq)}


def sft_one_step(hf_path, blend, cache_dir, seq, global_batch_size, micro_batch_size):
    """One optimizer step on SFTData's first global batch at the current TP/PP/DP layout."""
    data = SFTData(blend, seq, global_batch_size, seed=5, epochs=1, valid_fraction=0.0, cache_dir=cache_dir)
    model = fox1_tiny()
    model.transformer_impl = "native"
    parallel = current_parallel(use_distributed_optimizer=True)
    chunks = build_model(model, parallel)
    load_hf_weights(chunks, torch.load(hf_path), model, parallel)
    ddp = wrap_ddp(chunks, transformer_config(model, parallel), parallel)
    configure_schedule_hooks(ddp)
    # eps = 1 keeps Adam's first step linear in the gradient (see tests/parallel/bodies.py)
    settings = OptimizerSettings(lr=0.5, eps=1.0, weight_decay=0.01, clip_grad=1.0)
    optimizer = build_optimizer(ddp, settings, parallel)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = list(data.micro_batches(0, micro_batch_size, dp_rank, dp))
    seq_length, mbs = data.pipeline_shape(micro_batch_size)
    result = train_step(ddp, optimizer, iter(micro), len(micro), seq_length, mbs)
    with params_gathered(ddp):
        weights = gather_hf_weights(ddp, model, parallel)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "tokens": result.num_tokens, "weights": weights,
            "skipped": result.skipped, "samples": torch.cat([m["sample_index"] for m in micro]).tolist()}


def pipeline_shape_mismatch(lengths, rows, seq):
    """A later pipeline stage that received its input in the pretraining shape [seq, mbs, hidden]
    (train_step given seq_length / micro_batch_size instead of SFTData.pipeline_shape)."""
    model, _, chunk = _tiny_native(seed=3)
    convs, masks = conversations(lengths, model.vocab_size, seed=4)
    chunk.decoder.input_tensor = torch.zeros(seq, len(rows), model.hidden_size)
    try:
        forward_step(iter([packed_batch(convs, masks, rows, seq)]), chunk)
    except ValueError as exc:
        return str(exc)
    return None
