"""The one place that knows how a HF `LlamaForCausalLM` and a megatron-core `GPTModel` name and
shape their weights (torchtitan's state_dict_adapter is the model for this file).

Everything else (per-rank mapping in hf_mapping, the streaming converters, the dist-checkpoint
reader, `megafox info`) asks this module for tensor names and shapes instead of spelling them.

Facts kept here:

* Names. HF: `model.embed_tokens.weight`, `model.layers.{i}.<tensor>`, `model.norm.weight`,
  `lm_head.weight`. megatron-core: `embedding.word_embeddings.weight`, `decoder.layers.{i}.<tensor>`
  (local layer numbering on each pipeline chunk), `decoder.final_layernorm.weight`,
  `output_layer.weight`. A layer comes in two spellings: the local spec keeps the norms as
  modules (`input_layernorm`, `pre_mlp_layernorm`); Transformer Engine fuses each norm into the
  linear layer after it (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`). The
  local spec *saves* under TE's names too (its `sharded_state_dict_keys_map`), so dist
  checkpoints always carry the TE spelling.
* Shapes. HF per-layer shapes; megatron per-rank shard shapes; and the global shapes
  dist_checkpointing stores (layers stacked on a leading axis, vocab padded).
* Layout. `linear_qkv` rows are grouped per KV group: for each group, its query heads, then its
  key head, then its value head, so a TP rank owns a contiguous run of whole groups.
  `linear_fc1` on each TP rank is [gate shard; up shard]: the full TP=1 tensor is [gate; up], but
  a TP=2 shard is not a plain row-slice of it. The vocabulary is padded with zero rows. With tied
  embeddings the output layer reuses the word embedding (HF has no `lm_head.weight`).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from megafox.config import ModelConfig

if TYPE_CHECKING:  # names and shapes need no torch (`megafox info` stays quick); the transforms import it
    import torch

Shape = Tuple[int, ...]

# ----------------------------------------------------------------------------------------------
# Names

HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
HF_LAYER_PREFIX = "model.layers."
# One HF decoder layer, in the order the streaming converters write it.
HF_INPUT_NORM = "input_layernorm.weight"
HF_Q, HF_K, HF_V, HF_O = (f"self_attn.{p}_proj.weight" for p in "qkvo")
HF_MLP_NORM = "post_attention_layernorm.weight"
HF_GATE, HF_UP, HF_DOWN = (f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
HF_LAYER_TENSORS = (HF_INPUT_NORM, HF_Q, HF_K, HF_V, HF_O, HF_MLP_NORM, HF_GATE, HF_UP, HF_DOWN)

MCORE_EMBEDDING = "embedding.word_embeddings.weight"
MCORE_FINAL_NORM = "decoder.final_layernorm.weight"
MCORE_OUTPUT_LAYER = "output_layer.weight"
MCORE_LAYER_PREFIX = "decoder.layers."
# GPTModel's weight-holding submodules: a checkpoint's model tensors start with one of these
MCORE_MODULE_PREFIXES = ("embedding.", "decoder.", "output_layer.")


@dataclasses.dataclass(frozen=True)
class LayerNames:
    """One megatron-core decoder layer's weight names (relative to `decoder.layers.{i}.`)."""
    input_norm: str
    qkv: str
    proj: str
    mlp_norm: str
    fc1: str
    fc2: str

    def all(self) -> Tuple[str, ...]:
        return (self.input_norm, self.qkv, self.proj, self.mlp_norm, self.fc1, self.fc2)


LOCAL_LAYER = LayerNames(
    input_norm="input_layernorm.weight", qkv="self_attention.linear_qkv.weight",
    proj="self_attention.linear_proj.weight", mlp_norm="pre_mlp_layernorm.weight",
    fc1="mlp.linear_fc1.weight", fc2="mlp.linear_fc2.weight")
TE_LAYER = dataclasses.replace(
    LOCAL_LAYER, input_norm="self_attention.linear_qkv.layer_norm_weight",
    mlp_norm="mlp.linear_fc1.layer_norm_weight")


def layer_names(te_names: bool) -> LayerNames:
    return TE_LAYER if te_names else LOCAL_LAYER


def local_to_te_names() -> Dict[str, str]:
    """Local-spec layer weight name -> the TE-spec name it is saved under."""
    return {local: te for local, te in zip(LOCAL_LAYER.all(), TE_LAYER.all()) if local != te}


def uses_te_names(keys: Iterable[str]) -> bool:
    """Whether a megatron state dict (or checkpoint index) spells the layer norms TE's way."""
    return any(k.endswith(TE_LAYER.input_norm) for k in keys)


def hf_layer_name(i: int, tensor: str) -> str:
    return f"{HF_LAYER_PREFIX}{i}.{tensor}"


def hf_layer_index(name: str) -> Optional[int]:
    """`model.layers.{i}.<tensor>` -> i; None for the embedding, final norm and head."""
    if not name.startswith(HF_LAYER_PREFIX):
        return None
    return int(name[len(HF_LAYER_PREFIX):].split(".", 1)[0])


def mcore_layer_name(i: int, tensor: str) -> str:
    return f"{MCORE_LAYER_PREFIX}{i}.{tensor}"


def mcore_stacked_name(tensor: str) -> str:
    """A layer weight as dist_checkpointing stores it: all layers stacked under one key."""
    return MCORE_LAYER_PREFIX + tensor


# ----------------------------------------------------------------------------------------------
# Shapes

def hf_layer_shapes(model: ModelConfig) -> Dict[str, Shape]:
    """One HF decoder layer: tensor name (relative to `model.layers.{i}.`) -> shape."""
    h, f = model.hidden_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_query_groups * model.head_dim
    return {HF_INPUT_NORM: (h,), HF_Q: (q, h), HF_K: (kv, h), HF_V: (kv, h), HF_O: (h, q),
            HF_MLP_NORM: (h,), HF_GATE: (f, h), HF_UP: (f, h), HF_DOWN: (h, f)}


def hf_plan(model: ModelConfig) -> List[Tuple[str, Shape]]:
    """Every tensor of the HF model with its shape, in stream order (embedding, layers, norm, head)."""
    h = model.hidden_size
    plan = [(HF_EMBEDDING, (model.vocab_size, h))]
    for i in range(model.num_layers):
        plan += [(hf_layer_name(i, n), s) for n, s in hf_layer_shapes(model).items()]
    plan.append((HF_FINAL_NORM, (h,)))
    if not model.tie_word_embeddings:
        plan.append((HF_LM_HEAD, (model.vocab_size, h)))
    return plan


def megatron_layer_shapes(model: ModelConfig, te_names: bool = False, tp: int = 1) -> Dict[str, Shape]:
    """One megatron-core decoder layer on one TP rank: name -> shard shape (tp=1: the full layer)."""
    n = layer_names(te_names)
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv_rows = (model.num_attention_heads + 2 * model.num_query_groups) * d
    return {n.input_norm: (h,), n.qkv: (qkv_rows // tp, h), n.proj: (h, model.num_attention_heads * d // tp),
            n.mlp_norm: (h,), n.fc1: (2 * f // tp, h), n.fc2: (h, f // tp)}


def megatron_global_shapes(model: ModelConfig, te_names: bool = True,
                           padded_vocab: Optional[int] = None) -> Dict[str, Shape]:
    """The global tensors dist_checkpointing stores for the model, with their shapes.

    Layers are stacked on a leading axis of size num_layers. The embedding (and the untied
    output layer) appear only with `padded_vocab`, since their row count depends on the TP size
    the checkpoint was padded for.
    """
    shapes = {mcore_stacked_name(k): (model.num_layers,) + s
              for k, s in megatron_layer_shapes(model, te_names).items()}
    shapes[MCORE_FINAL_NORM] = (model.hidden_size,)
    if padded_vocab is not None:
        shapes[MCORE_EMBEDDING] = (padded_vocab, model.hidden_size)
        if not model.tie_word_embeddings:
            shapes[MCORE_OUTPUT_LAYER] = (padded_vocab, model.hidden_size)
    return shapes


# ----------------------------------------------------------------------------------------------
# Tensor transforms (full, unsharded tensors unless said otherwise)

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    import torch

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
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return (q.reshape(-1, hidden).clone(), k.reshape(-1, hidden).clone(), v.reshape(-1, hidden).clone())


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    import torch

    if weight.shape[0] == padded_rows:
        return weight
    pad = weight.new_zeros(padded_rows - weight.shape[0], weight.shape[1])
    return torch.cat([weight, pad], dim=0)


def tp_rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Column-parallel layers (qkv, embedding, output layer) split their rows over TP ranks."""
    return t.chunk(tp, dim=0)[rank].clone()


def tp_cols(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Row-parallel layers (attention output, fc2) split their columns over TP ranks."""
    return t.chunk(tp, dim=1)[rank].clone()


def _fc1_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    import torch

    return torch.cat([tp_rows(gate, tp, rank), tp_rows(up, tp, rank)], dim=0)


# ----------------------------------------------------------------------------------------------
# One decoder layer, both directions

def hf_layer_to_megatron(hf: Dict[str, torch.Tensor], i: int, model: ModelConfig, tp: int,
                         tp_rank: int, te_names: bool = False) -> Dict[str, torch.Tensor]:
    """HF layer `i` (full names) -> one TP rank's layer weights, named relative to the layer."""
    n = layer_names(te_names)

    def get(tensor: str) -> torch.Tensor:
        return hf[hf_layer_name(i, tensor)]

    qkv = fuse_qkv(get(HF_Q), get(HF_K), get(HF_V), model)
    return {
        n.input_norm: get(HF_INPUT_NORM).clone(),
        n.qkv: tp_rows(qkv, tp, tp_rank),
        n.proj: tp_cols(get(HF_O), tp, tp_rank),
        n.mlp_norm: get(HF_MLP_NORM).clone(),
        n.fc1: _fc1_shard(get(HF_GATE), get(HF_UP), tp, tp_rank),
        n.fc2: tp_cols(get(HF_DOWN), tp, tp_rank),
    }


def megatron_layer_to_hf(shards: List[Dict[str, torch.Tensor]], i: int, model: ModelConfig,
                         te_names: bool = False) -> Dict[str, torch.Tensor]:
    """One layer's TP shards (named relative to the layer, in TP-rank order) -> HF layer `i`."""
    import torch

    n = layer_names(te_names)
    q, k, v = split_qkv(torch.cat([s[n.qkv] for s in shards], dim=0), model)
    gates, ups = zip(*(s[n.fc1].chunk(2, dim=0) for s in shards))
    tensors = {
        HF_INPUT_NORM: shards[0][n.input_norm].clone(),
        HF_Q: q, HF_K: k, HF_V: v,
        HF_O: torch.cat([s[n.proj] for s in shards], dim=1),
        HF_MLP_NORM: shards[0][n.mlp_norm].clone(),
        HF_GATE: torch.cat(gates, dim=0),
        HF_UP: torch.cat(ups, dim=0),
        HF_DOWN: torch.cat([s[n.fc2] for s in shards], dim=1),
    }
    return {hf_layer_name(i, k): t for k, t in tensors.items()}


def missing_hf_tensors(hf: Iterable[str], model: ModelConfig) -> List[str]:
    """The HF tensor names a Llama of this config needs that `hf` lacks."""
    have = set(hf)
    return [name for name, _ in hf_plan(model) if name not in have]
