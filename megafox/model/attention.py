"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

megatron-core's local `DotProductAttention` materializes the [b, heads, s, s] score matrix and
repeats K/V for GQA. SDPA dispatches to flash / cuDNN / memory-efficient kernels on GPU (causal,
GQA without repeating K/V) and to an exact math kernel on CPU, so this is a drop-in
`core_attention` for a megatron-core `SelfAttention` ModuleSpec.

Packed sequences (SFT).  With `packed_seq_params` (megatron-core's THD format: the micro-batch is
one sequence of t tokens, q/k/v arrive as [t, heads, d], and `cu_seqlens` marks the segments -
conversations, padding) attention is causal within each segment and never crosses one.  RoPE has
already restarted its positions per segment (megatron's `apply_rotary_pos_emb` thd path), so each
segment computes exactly what it would alone.  `packed_kernel` chooses how:
  segments  one causal SDPA call per segment (default): exact, memory O(longest segment^2) on the
            math kernel, and each call is flash/cuDNN-eligible on GPU; reads the offsets on the
            host once per forward (from the batch's CPU copy, see `packed_seq_params`)
  mask      one SDPA call over all t tokens with a block-diagonal causal mask: O(t^2) memory;
            the straightforward reference
  varlen    torch's `varlen_attn` (flash attention over cu_seqlens, one kernel, no host sync):
            CUDA with fp16/bf16 only; not measured yet against `segments` (bench/packing.py
            --kernels times them on a GPU)
"""
from __future__ import annotations

import math
import typing
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megafox.config import PackedAttention

PACKED_KERNELS = typing.get_args(PackedAttention)  # the config owns the choices

# The host copy of cu_seqlens rides on the PackedSeqParams object (shared by every layer of one
# forward), so the segments kernel does not copy device offsets to the host in every layer.
_HOST_OFFSETS = "_megafox_host_cu_seqlens"


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int,
                      device: Optional[torch.device] = None) -> PackedSeqParams:
    """Self-attention PackedSeqParams (THD) over segments [cu_seqlens[i], cu_seqlens[i+1]).

    `cu_seqlens` as a batch carries it (int32, on the CPU); it is moved to `device` for the
    kernels, its host values are kept for the segments kernel."""
    host = cu_seqlens.detach().to("cpu", torch.int64).tolist()
    cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True) if device is not None else \
        cu_seqlens.to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))
    setattr(params, _HOST_OFFSETS, host)
    return params


def _host_offsets(params: PackedSeqParams) -> List[int]:
    host = getattr(params, _HOST_OFFSETS, None)
    if host is None:  # built elsewhere: read the device offsets once and keep them
        host = params.cu_seqlens_q.detach().to("cpu", torch.int64).tolist()
        setattr(params, _HOST_OFFSETS, host)
    return host


class SDPAttention(MegatronModule):
    """Causal (or padding-masked) GQA attention: [s, b, heads, d] in, [s, b, heads * d] out;
    packed (THD): [t, heads, d] in, [t, heads * d] out."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, packed_kernel: str = "segments"):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use the te spec")
        if packed_kernel not in PACKED_KERNELS:
            raise ValueError(f"packed attention kernel: must be one of {', '.join(PACKED_KERNELS)}, "
                             f"got {packed_kernel!r}")
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if packed_kernel == "varlen":
            _check_varlen(self.dropout_p)
        self.packed_kernel = packed_kernel

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, causal)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron masks mark positions to drop with True
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal, scale=self.softmax_scale, enable_gqa=self._gqa)
        s, b = query.shape[0], query.shape[1]
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    @property
    def _gqa(self) -> bool:
        return self.heads_per_partition != self.groups_per_partition

    def _packed(self, query, key, value, params: PackedSeqParams, causal: bool):
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention: packed sequences must use the 'thd' format, got {params.qkv_format!r}")
        if params.cu_seqlens_kv is not params.cu_seqlens_q and not torch.equal(params.cu_seqlens_kv,
                                                                              params.cu_seqlens_q):
            raise ValueError("SDPAttention: packed self-attention needs the same segments for queries and keys")
        if query.dim() != 3:
            raise ValueError(f"SDPAttention: packed q/k/v must be [tokens, heads, dim] (a micro-batch of one "
                             f"THD sequence), got {tuple(query.shape)}")
        t = query.shape[0]
        dropout = self.dropout_p if self.training else 0.0
        if self.packed_kernel == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            cu = params.cu_seqlens_q.to(torch.int32)
            out = varlen_attn(query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_kv,
                              scale=self.softmax_scale, window_size=(-1, 0) if causal else (-1, -1),
                              enable_gqa=self._gqa)
            return out.reshape(t, -1)
        if self.packed_kernel == "mask":
            bounds = params.cu_seqlens_q.to(query.device)
            segment = torch.bucketize(torch.arange(t, device=query.device), bounds[1:].to(torch.int64), right=True)
            allowed = segment[:, None] == segment[None, :]
            if causal:
                allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=self._gqa)
            return out[0].transpose(0, 1).reshape(t, -1)
        offsets = _host_offsets(params)
        if offsets[0] != 0 or offsets[-1] != t:
            raise ValueError(f"SDPAttention: cu_seqlens covers [{offsets[0]}, {offsets[-1]}) but the packed "
                             f"sequence has {t} tokens")
        pieces = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=self._gqa)
            pieces.append(out[0].transpose(0, 1))  # [len, h, d]
        return torch.cat(pieces).reshape(t, -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}


def _check_varlen(dropout_p: float) -> None:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        raise ValueError(f"packed attention kernel 'varlen' needs torch.nn.attention.varlen, which "
                         f"torch {torch.__version__} does not have; use 'segments'") from None
    if not torch.cuda.is_available():
        raise ValueError("packed attention kernel 'varlen' runs flash attention, which needs a CUDA GPU; "
                         "use 'segments' here")
    if dropout_p:
        raise ValueError("packed attention kernel 'varlen' has no attention dropout; use 'segments'")


def _tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()
