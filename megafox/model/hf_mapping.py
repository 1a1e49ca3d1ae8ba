"""HF `LlamaForCausalLM` <-> megatron-core `GPTModel` for a whole model on a TP/PP(/VPP) layout.

megatron-core shards each weight over tensor-parallel ranks, splits layers over pipeline (and
virtual pipeline) stages and pads the vocabulary. This module distributes a HF state dict over the
ranks of a `Layout` and gathers it back, and translates `config.json`. Tensor names, shapes and
the per-layer transforms (GQA-grouped QKV, [gate; up] FC1) come from `megafox.model.hf_adapter`.

Per-rank state dicts are keyed by `RankKey(pp_rank, vp_stage, tp_rank)` and use the local layer
numbering megatron-core's modules expect. With tied embeddings and PP>1 the last stage holds a
copy of the embedding in its output layer, kept equal by megatron-core's embedding group.
"""
from __future__ import annotations

from typing import Dict, Iterator, NamedTuple, Optional

import torch

from megafox.config import ModelConfig
from megafox.model.hf_adapter import (
    HF_EMBEDDING, HF_FINAL_NORM, HF_LM_HEAD, MCORE_EMBEDDING, MCORE_FINAL_NORM, MCORE_OUTPUT_LAYER,
    hf_layer_to_megatron, mcore_layer_name, megatron_layer_to_hf, missing_hf_tensors, pad_vocab, tp_rows)
# Older callers import the per-layer transforms from here; they live in the adapter.
from megafox.model.hf_adapter import fuse_qkv, split_qkv  # noqa: F401,E402


class RankKey(NamedTuple):
    pp_rank: int
    vp_stage: int  # 0 without virtual pipeline
    tp_rank: int


class Layout(NamedTuple):
    tp: int = 1
    pp: int = 1
    vpp: int = 1

    def ranks(self) -> Iterator[RankKey]:
        for p in range(self.pp):
            for v in range(self.vpp):
                for t in range(self.tp):
                    yield RankKey(p, v, t)


def layer_range(model: ModelConfig, layout: Layout, pp_rank: int, vp_stage: int) -> range:
    """Global layer indices held by one (pipeline rank, virtual stage) model chunk."""
    per_chunk = model.num_layers // (layout.pp * layout.vpp)
    start = (vp_stage * layout.pp + pp_rank) * per_chunk
    return range(start, start + per_chunk)


def is_first_chunk(layout: Layout, key: RankKey) -> bool:
    return key.pp_rank == 0 and key.vp_stage == 0


def is_last_chunk(layout: Layout, key: RankKey) -> bool:
    return key.pp_rank == layout.pp - 1 and key.vp_stage == layout.vpp - 1


def hf_to_megatron(hf: Dict[str, torch.Tensor], model: ModelConfig, layout: Layout = Layout(),
                   te_names: bool = False) -> Dict[RankKey, Dict[str, torch.Tensor]]:
    """A HF Llama state dict -> megatron-core state dicts for every rank of `layout`."""
    _check_hf_keys(hf, model)
    padded = model.padded_vocab_size(layout.tp)
    embed = pad_vocab(hf[HF_EMBEDDING], padded)
    lm_head = embed if model.tie_word_embeddings else pad_vocab(hf[HF_LM_HEAD], padded)
    out: Dict[RankKey, Dict[str, torch.Tensor]] = {}
    for key in layout.ranks():
        sd: Dict[str, torch.Tensor] = {}
        if is_first_chunk(layout, key):
            sd[MCORE_EMBEDDING] = tp_rows(embed, layout.tp, key.tp_rank)
        for local, i in enumerate(layer_range(model, layout, key.pp_rank, key.vp_stage)):
            layer = hf_layer_to_megatron(hf, i, model, layout.tp, key.tp_rank, te_names)
            sd.update({mcore_layer_name(local, k): v for k, v in layer.items()})
        if is_last_chunk(layout, key):
            sd[MCORE_FINAL_NORM] = hf[HF_FINAL_NORM].clone()
            # Tied and on the first stage too: the output layer reads the embedding itself.
            if not (model.tie_word_embeddings and is_first_chunk(layout, key)):
                sd[MCORE_OUTPUT_LAYER] = tp_rows(lm_head, layout.tp, key.tp_rank)
        out[key] = sd
    return out


def megatron_to_hf(ranks: Dict[RankKey, Dict[str, torch.Tensor]], model: ModelConfig,
                   layout: Layout = Layout(), te_names: bool = False) -> Dict[str, torch.Tensor]:
    """megatron-core per-rank state dicts -> a HF Llama state dict (vocab padding removed)."""
    hf: Dict[str, torch.Tensor] = {}
    tp_ranks = range(layout.tp)
    first, last = RankKey(0, 0, 0), RankKey(layout.pp - 1, layout.vpp - 1, 0)
    embed = torch.cat([ranks[first._replace(tp_rank=t)][MCORE_EMBEDDING] for t in tp_ranks], 0)
    hf[HF_EMBEDDING] = embed[: model.vocab_size].clone()
    for p in range(layout.pp):
        for v in range(layout.vpp):
            for local, i in enumerate(layer_range(model, layout, p, v)):
                prefix = mcore_layer_name(local, "")
                shards = [{k[len(prefix):]: t for k, t in ranks[RankKey(p, v, tp)].items() if k.startswith(prefix)}
                          for tp in tp_ranks]
                hf.update(megatron_layer_to_hf(shards, i, model, te_names))
    hf[HF_FINAL_NORM] = ranks[last][MCORE_FINAL_NORM].clone()
    if not model.tie_word_embeddings:
        head = torch.cat([ranks[last._replace(tp_rank=t)][MCORE_OUTPUT_LAYER] for t in tp_ranks], 0)
        hf[HF_LM_HEAD] = head[: model.vocab_size].clone()
    return hf


def _check_hf_keys(hf: Dict[str, torch.Tensor], model: ModelConfig) -> None:
    missing = missing_hf_tensors(hf, model)
    if missing:
        raise KeyError(f"HF state dict is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    emb = hf[HF_EMBEDDING]
    if tuple(emb.shape) != (model.vocab_size, model.hidden_size):
        raise ValueError(f"{HF_EMBEDDING} has shape {tuple(emb.shape)}, config expects "
                         f"({model.vocab_size}, {model.hidden_size})")


def load_rank_state(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load one rank's mapped weights; every parameter must be covered (extra_state may not)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"weights do not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def rank_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """One rank's weights in the form `megatron_to_hf` takes (no extra_state)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


def hf_config_dict(model: ModelConfig, torch_dtype: Optional[str] = "bfloat16") -> Dict:
    """The `config.json` of a LlamaForCausalLM with this model's real values."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": model.bos_token_id,
        "eos_token_id": model.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "head_dim": model.head_dim,
        "initializer_range": model.init_std,
        "intermediate_size": model.ffn_hidden_size,
        "max_position_embeddings": model.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": model.num_attention_heads,
        "num_hidden_layers": model.num_layers,
        "num_key_value_heads": model.num_query_groups,
        "pretraining_tp": 1,
        "rms_norm_eps": model.norm_eps,
        "rope_scaling": None,
        "rope_theta": model.rope_theta,
        "tie_word_embeddings": model.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": model.vocab_size,
    }


def model_config_from_hf(cfg: Dict, name: str = "from-hf") -> ModelConfig:
    """A ModelConfig from a HF config.json dict; rejects what megafox cannot represent."""
    cfg = _fold_rope_parameters(cfg)
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("llama", "mistral") or (archs and archs[0] not in ("LlamaForCausalLM", "MistralForCausalLM")):
        raise ValueError(f"not a Llama-compatible model: model_type={cfg.get('model_type')!r}, architectures={archs}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{flag}=true is not supported (Fox-1/Llama have no biases)")
    if cfg.get("rope_scaling"):
        raise ValueError(f"rope_scaling={cfg['rope_scaling']!r} is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg.get('hidden_act')!r} is not supported (needs silu)")
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        name=name,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else 1,
        eos_token_id=_first(cfg.get("eos_token_id"), 2),
        init_std=cfg.get("initializer_range", 0.02),
    ).validate()


def _fold_rope_parameters(cfg: Dict) -> Dict:
    """transformers 5 writes `rope_parameters: {rope_theta, rope_type}` instead of 4.x's
    `rope_theta` / `rope_scaling`; fold it back so the theta is never silently the default."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return cfg
    cfg = dict(cfg)
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params  # rejected below, by name
    if "rope_theta" in params:
        cfg["rope_theta"] = params["rope_theta"]
    return cfg


def _first(value, default):
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return value[0]
    return value
