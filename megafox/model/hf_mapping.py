"""The state-dict adapter between Hugging Face `LlamaForCausalLM` and megatron-core `GPTModel`.

HF keeps q/k/v and gate/up as separate matrices; megatron-core fuses them and shards them over
tensor-parallel ranks, splits layers over pipeline (and virtual pipeline) stages, and pads the
vocabulary. The two layout facts conversion bugs come from (GQA interleaving, tied embeddings)
live here and only here:

* `linear_qkv` rows are grouped per KV group: for each group, its query heads, then its key
  head, then its value head. A TP rank owns a contiguous run of whole groups.
* `linear_fc1` on each TP rank is [gate shard; up shard], so the full TP=1 tensor is [gate; up]
  but a TP=2 shard is not a plain row-slice of it.
* With tied embeddings the output layer reuses `embedding.word_embeddings.weight`; with PP>1 the
  last stage holds a copy in `output_layer.weight`, kept equal by megatron-core's embedding group.

Per-rank state dicts are keyed by `RankKey(pp_rank, vp_stage, tp_rank)` and use the local layer
numbering megatron-core's modules expect.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from megafox.config import ModelConfig


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


# ----------------------------------------------------------------------------------------------
# Tensor-level transforms (full, unsharded tensors)

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    d, groups = model.head_dim, model.num_query_groups
    per_group = model.num_attention_heads // groups
    hidden = q.shape[1]
    q = q.view(groups, per_group * d, hidden)
    k = k.view(groups, d, hidden)
    v = v.view(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, groups = model.head_dim, model.num_query_groups
    per_group = model.num_attention_heads // groups
    hidden = qkv.shape[1]
    grouped = qkv.view(groups, (per_group + 2) * d, hidden)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(-1, hidden).clone(), k.reshape(-1, hidden).clone(), v.reshape(-1, hidden).clone())


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if weight.shape[0] == padded_rows:
        return weight
    pad = weight.new_zeros(padded_rows - weight.shape[0], weight.shape[1])
    return torch.cat([weight, pad], dim=0)


def _tp_rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.chunk(t, tp, dim=0)[rank].clone()


def _tp_cols(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.chunk(t, tp, dim=1)[rank].clone()


def _fc1_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([_tp_rows(gate, tp, rank), _tp_rows(up, tp, rank)], dim=0)


# ----------------------------------------------------------------------------------------------
# Whole state dicts

def _norm_keys(te_names: bool) -> Tuple[str, str]:
    if te_names:  # the TE spec fuses each norm into the linear layer after it
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def hf_layer_to_megatron(hf: Dict[str, torch.Tensor], i: int, model: ModelConfig, tp: int,
                         tp_rank: int, te_names: bool = False) -> Dict[str, torch.Tensor]:
    """One decoder layer, HF layer `i` -> the local keys of one TP rank (without the prefix)."""
    p = f"model.layers.{i}."
    qkv = fuse_qkv(hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                   hf[p + "self_attn.v_proj.weight"], model)
    in_norm, mlp_norm = _norm_keys(te_names)
    return {
        in_norm: hf[p + "input_layernorm.weight"].clone(),
        "self_attention.linear_qkv.weight": _tp_rows(qkv, tp, tp_rank),
        "self_attention.linear_proj.weight": _tp_cols(hf[p + "self_attn.o_proj.weight"], tp, tp_rank),
        mlp_norm: hf[p + "post_attention_layernorm.weight"].clone(),
        "mlp.linear_fc1.weight": _fc1_shard(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"], tp, tp_rank),
        "mlp.linear_fc2.weight": _tp_cols(hf[p + "mlp.down_proj.weight"], tp, tp_rank),
    }


def hf_to_megatron(hf: Dict[str, torch.Tensor], model: ModelConfig, layout: Layout = Layout(),
                   te_names: bool = False) -> Dict[RankKey, Dict[str, torch.Tensor]]:
    """A HF Llama state dict -> megatron-core state dicts for every rank of `layout`."""
    _check_hf_keys(hf, model)
    padded = model.padded_vocab_size(layout.tp)
    embed = pad_vocab(hf["model.embed_tokens.weight"], padded)
    lm_head = embed if model.tie_word_embeddings else pad_vocab(hf["lm_head.weight"], padded)
    out: Dict[RankKey, Dict[str, torch.Tensor]] = {}
    for key in layout.ranks():
        sd: Dict[str, torch.Tensor] = {}
        if is_first_chunk(layout, key):
            sd["embedding.word_embeddings.weight"] = _tp_rows(embed, layout.tp, key.tp_rank)
        for local, i in enumerate(layer_range(model, layout, key.pp_rank, key.vp_stage)):
            layer = hf_layer_to_megatron(hf, i, model, layout.tp, key.tp_rank, te_names)
            sd.update({f"decoder.layers.{local}.{k}": v for k, v in layer.items()})
        if is_last_chunk(layout, key):
            sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
            # Tied and on the first stage too: the output layer reads the embedding itself.
            if not (model.tie_word_embeddings and is_first_chunk(layout, key)):
                sd["output_layer.weight"] = _tp_rows(lm_head, layout.tp, key.tp_rank)
        out[key] = sd
    return out


def megatron_layer_to_hf(shards: List[Dict[str, torch.Tensor]], i: int, model: ModelConfig,
                         te_names: bool = False) -> Dict[str, torch.Tensor]:
    """One layer's TP shards (local keys without prefix, in TP-rank order) -> HF layer `i`."""
    in_norm, mlp_norm = _norm_keys(te_names)
    qkv = torch.cat([s["self_attention.linear_qkv.weight"] for s in shards], dim=0)
    q, k, v = split_qkv(qkv, model)
    gates, ups = zip(*(torch.chunk(s["mlp.linear_fc1.weight"], 2, dim=0) for s in shards))
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": shards[0][in_norm].clone(),
        p + "self_attn.q_proj.weight": q,
        p + "self_attn.k_proj.weight": k,
        p + "self_attn.v_proj.weight": v,
        p + "self_attn.o_proj.weight": torch.cat([s["self_attention.linear_proj.weight"] for s in shards], dim=1),
        p + "post_attention_layernorm.weight": shards[0][mlp_norm].clone(),
        p + "mlp.gate_proj.weight": torch.cat(gates, dim=0),
        p + "mlp.up_proj.weight": torch.cat(ups, dim=0),
        p + "mlp.down_proj.weight": torch.cat([s["mlp.linear_fc2.weight"] for s in shards], dim=1),
    }


def megatron_to_hf(ranks: Dict[RankKey, Dict[str, torch.Tensor]], model: ModelConfig,
                   layout: Layout = Layout(), te_names: bool = False) -> Dict[str, torch.Tensor]:
    """megatron-core per-rank state dicts -> a HF Llama state dict (vocab padding removed)."""
    hf: Dict[str, torch.Tensor] = {}
    tp_ranks = range(layout.tp)
    first, last = RankKey(0, 0, 0), RankKey(layout.pp - 1, layout.vpp - 1, 0)
    embed = torch.cat([ranks[first._replace(tp_rank=t)]["embedding.word_embeddings.weight"] for t in tp_ranks], 0)
    hf["model.embed_tokens.weight"] = embed[: model.vocab_size].clone()
    for p in range(layout.pp):
        for v in range(layout.vpp):
            for local, i in enumerate(layer_range(model, layout, p, v)):
                prefix = f"decoder.layers.{local}."
                shards = [{k[len(prefix):]: t for k, t in ranks[RankKey(p, v, tp)].items() if k.startswith(prefix)}
                          for tp in tp_ranks]
                hf.update(megatron_layer_to_hf(shards, i, model, te_names))
    hf["model.norm.weight"] = ranks[last]["decoder.final_layernorm.weight"].clone()
    if not model.tie_word_embeddings:
        head = torch.cat([ranks[last._replace(tp_rank=t)]["output_layer.weight"] for t in tp_ranks], 0)
        hf["lm_head.weight"] = head[: model.vocab_size].clone()
    return hf


def _check_hf_keys(hf: Dict[str, torch.Tensor], model: ModelConfig) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not model.tie_word_embeddings:
        needed.append("lm_head.weight")
    for i in range(model.num_layers):
        needed += [f"model.layers.{i}.{n}.weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    missing = [k for k in needed if k not in hf]
    if missing:
        raise KeyError(f"HF state dict is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    emb = hf["model.embed_tokens.weight"]
    if tuple(emb.shape) != (model.vocab_size, model.hidden_size):
        raise ValueError(f"model.embed_tokens.weight has shape {tuple(emb.shape)}, config expects "
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
