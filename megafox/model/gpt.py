"""`FoxGPTModel`: megatron-core's GPTModel plus an optional fused LM-head + cross-entropy, and
the padded vocabulary rows left out of every softmax.

The decoder is megatron-core's, chosen through the layer spec; only the loss at the output
layer differs, so that a 256K-vocabulary model never materializes its full logits.

Megatron pads the vocabulary to a multiple of 128 x TP rows (`padded_vocab_size`), and
megafox-to-hf exports only the real ones. So that the model trained is the model released, the
padded rows' logits are -inf wherever logits leave the model (the output layer's output, local
shard or TP-gathered, for the loss, validation, evaluation and generation alike) and inside the
fused loss: they take no part in any softmax or argmax and get zero gradient. A vocabulary that
needs no padding (Fox-1's 256,000 up to TP16) installs nothing.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megafox.model.fused_loss import DEFAULT_CHUNK_TOKENS, fused_linear_cross_entropy

_POSTPROCESS_SIGNATURE = inspect.signature(GPTModel._postprocess)


class FoxGPTModel(GPTModel):
    """With `fused_loss`, a forward with labels returns the same per-token losses [b, s] as
    GPTModel (loss_func is unchanged) through `megafox.model.fused_loss`.

    Passing `loss_mask=` to forward as well (and loss_grad="precompute", the default) selects the
    faster variant that computes the LM-head gradients during the forward; the caller must then reduce the losses as
    c * sum(loss_mask * losses), which megafox's loss_func does (anything else raises).
    """

    def __init__(self, *args, fused_loss: bool = False, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 loss_grad: str = "precompute", loss_kernel: str = "eager",
                 real_vocab_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if fused_loss and self.config.mtp_num_layers is not None:
            raise ValueError("fused_loss does not support multi-token prediction (mtp_num_layers)")
        self.fused_loss = fused_loss
        self.loss_chunk_tokens = loss_chunk_tokens
        self.grads_in_forward = loss_grad == "precompute"
        self.loss_kernel = loss_kernel
        # the real vocabulary when the model holds padded rows past it, else None
        self.real_vocab_size = real_vocab_size if real_vocab_size is not None and real_vocab_size < self.vocab_size else None
        if self.real_vocab_size is not None and self.post_process:
            self.output_layer.register_forward_hook(self._mask_padded_logits)

    def _postprocess(self, *args, **kwargs):
        bound = _POSTPROCESS_SIGNATURE.bind(self, *args, **kwargs)
        a = bound.arguments
        labels = a.get("labels")
        inference = a.get("inference_context") is not None and not self.training
        if not (self.fused_loss and self.post_process and labels is not None and not inference
                and not a.get("mtp_in_postprocess")):
            return super()._postprocess(*args, **kwargs)
        return self._fused_loss(a["hidden_states"], labels, a.get("loss_mask") if self.grads_in_forward else None)

    def _fused_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor, loss_mask) -> torch.Tensor:
        tp = self.pg_collection.tp
        # The same communication ColumnParallelLinear wraps around its GEMM: all-gather the
        # sequence-parallel shards (reduce-scatter their gradient), or an identity whose gradient
        # is all-reduced over TP (each rank's vocab shard contributes part of it).
        if self.config.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, True, group=tp)
        elif tp is not None and tp.size() > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp)
        s, b, h = hidden_states.shape
        if labels.shape != (b, s):
            raise ValueError(f"fused loss: labels {tuple(labels.shape)} do not match [batch, seq] = {(b, s)}")
        # The output layer is not called, but its forward pre-hooks must run: with DDP's
        # overlap_param_gather they are what waits for the weight's all-gather.
        _run_forward_pre_hooks(self.output_layer)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        # tokens in [s, b] order, as the decoder produces them: no copy of the hidden states
        token_weights = None if loss_mask is None else loss_mask.transpose(0, 1).reshape(-1)
        losses = fused_linear_cross_entropy(
            hidden_states.reshape(s * b, h), weight, labels.transpose(0, 1).reshape(-1),
            token_weights=token_weights, chunk_tokens=self.loss_chunk_tokens,
            group=tp if tp is not None and tp.size() > 1 else None, kernel=self.loss_kernel,
            vocab_size=self.real_vocab_size)
        return losses.view(s, b).transpose(0, 1).contiguous()

    def _mask_padded_logits(self, module, args, output):
        """Forward hook of the output layer: -inf in the padded columns of its logits, which are
        this rank's vocab shard [.., vocab / tp] or, gathered over TP, the whole padded vocab."""
        logits = output[0]
        tp = self.pg_collection.tp
        tp_size = tp.size() if tp is not None else 1
        if logits.shape[-1] == self.vocab_size:  # TP1, or gathered
            start = 0
        elif logits.shape[-1] * tp_size == self.vocab_size:
            start = tp.rank() * logits.shape[-1]
        else:
            raise RuntimeError(f"output layer: logits of width {logits.shape[-1]} are neither the padded "
                               f"vocabulary ({self.vocab_size}) nor its 1/{tp_size} shard")
        valid = self.real_vocab_size - start
        if valid < logits.shape[-1]:
            # in place (the GEMM's own output, which nothing saved for backward): no copy of the
            # logits; the fill's backward zeroes the padded columns' gradient
            logits[..., max(valid, 0):] = float("-inf")
        return output


def _run_forward_pre_hooks(module: torch.nn.Module) -> None:
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, (), {})
        else:
            hook(module, ())
