"""`torch.compile` of the decoder layers (build option `compile_layers`).

Each megatron-core TransformerLayer is compiled in place (`nn.Module.compile`: parameter and
state-dict names unchanged, so checkpoints and DDP are unaffected). Inductor fuses what runs
between the GEMMs and attention - RMSNorm, RoPE, SwiGLU, residual adds - into a few kernels
(Triton on GPU). Layers share one compiled graph (parameters are graph inputs), so compile time
does not grow with depth; each new sequence length compiles once.

megatron-core's linear layers warn (a DeprecationWarning about `tp_group`) on every call on
rank 0; dynamo cannot trace that call, so the graph breaks around each linear layer. The GEMMs
run as cuBLAS calls either way; what is fused sits between them.
"""
from __future__ import annotations

import torch


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of a megatron-core GPTModel in place; returns how many."""
    for layer in model.decoder.layers:
        layer.compile(dynamic=False)
    return len(model.decoder.layers)
