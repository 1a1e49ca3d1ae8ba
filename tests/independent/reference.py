"""The independent side of the comparisons: transformers' LlamaForCausalLM trained by plain torch
(per-token mean loss, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW), and the inputs both
sides share. Nothing here goes through megafox's or megatron-core's training code."""
from typing import Dict, List

import torch
import torch.nn.functional as F

from megafox.config import ModelConfig
from tests.support.hf_reference import hf_llama

SEQ, GLOBAL_BATCH = 16, 8
# Chosen so every path of the update is visible at 1e-5 (test_reference_settings_make_every_path_matter
# checks it): clip active (the raw grad norm is 3-4x it); eps within an order of magnitude of the
# clipped grads, so Adam is not scale-invariant and clipping changes the step; weight decay large
# enough that decaying the norms too would show; betas that are not the defaults and two steps,
# so the moments' history (not only the first step's g/|g|) is compared.
SETTINGS = dict(lr=1e-2, min_lr=0.0, beta1=0.8, beta2=0.9, eps=3e-4, weight_decay=0.1, clip_grad=0.5)


def make_batches(vocab_size: int, steps: int = 2, seed: int = 11) -> List[Dict[str, torch.Tensor]]:
    """Global batches of GLOBAL_BATCH x SEQ with a loss mask that gives every sequence a different
    token count: a masked prefix (a prompt), a fully masked sequence, a masked tail (padding) and
    scattered holes, so a mean per micro-batch or per sequence would differ from the per-token mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
        mask = torch.ones(GLOBAL_BATCH, SEQ)
        mask[0, :6] = 0
        mask[2, :] = 0
        mask[3, 10:] = 0
        mask[5] = (torch.rand(SEQ, generator=g) > 0.4).float()
        mask[6, :SEQ - 2] = 0
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask})
    return out


def hf_weights_padded(hf_state: Dict[str, torch.Tensor], padded_vocab: int) -> Dict[str, torch.Tensor]:
    out = dict(hf_state)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in out:
            w = out[key]
            out[key] = torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], w.shape[1])])
    return out


def hf_train(model: ModelConfig, state: Dict[str, torch.Tensor], batches, settings=SETTINGS, clip: bool = True,
             decay_1d: bool = False, vocab_size: int = None):
    """Train a LlamaForCausalLM of `model`'s shape (vocabulary `vocab_size`, default the model's)
    from `state`, one AdamW step per batch. Weight decay on the matrices only, as megatron-core's
    default param groups do (`get_standard_config_overrides`: wd_mult 0 for every 1-D parameter
    and bias; the scheduler applies it); `decay_1d` decays the norms too."""
    import dataclasses

    shape = dataclasses.replace(model, vocab_size=vocab_size or model.vocab_size)
    hf = hf_llama(shape, seed=0)
    hf.load_state_dict(state)
    hf.train()
    named = dict(hf.named_parameters())  # the tied lm_head appears once, as the embedding
    matrices = [p for p in named.values() if p.ndim >= 2]
    vectors = [p for p in named.values() if p.ndim < 2]
    assert vectors and all(n.endswith("norm.weight") for n, p in named.items() if p.ndim < 2)
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": settings["weight_decay"]},
         {"params": vectors, "weight_decay": settings["weight_decay"] if decay_1d else 0.0}],
        lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]), eps=settings["eps"])
    out = []
    for batch in batches:
        opt.zero_grad()
        logits = hf(input_ids=batch["tokens"]).logits.float()
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                     reduction="none")
        mask = batch["loss_mask"].reshape(-1)
        loss = (token_loss * mask).sum() / mask.sum()
        loss.backward()
        max_norm = settings["clip_grad"] if clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), max_norm)
        opt.step()
        weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
        out.append({"loss": loss.item(), "grad_norm": grad_norm.item(), "tokens": int(mask.sum()),
                    "weights": weights})
    return out
