"""`FoxGPTModel`: megatron-core's GPTModel plus an optional fused LM-head + cross-entropy.

The decoder is megatron-core's, chosen through the layer spec; only the loss at the output
layer differs, so that a 256K-vocabulary model never materializes its full logits.
"""
from __future__ import annotations

from megatron.core.models.gpt import GPTModel


class FoxGPTModel(GPTModel):
    def __init__(self, *args, fused_loss: bool = False, loss_chunk_tokens: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.loss_chunk_tokens = loss_chunk_tokens
