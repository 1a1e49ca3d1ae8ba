"""HF-named weights as a stream of small groups (embedding, one layer, final norm + head).

Both directions go through the same groups, so peak memory is one group, not one model:
`groups_from_checkpoint` reads a dist checkpoint layer by layer; `groups_from_hf` reads a HF
directory's safetensors lazily; `fill_model` copies groups into a TP1/PP1 megatron-core model.
The per-layer GQA/SwiGLU/tied-embedding mapping itself lives in megafox.model.hf_mapping.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from checkpoints_tools.common import ToolError
from checkpoints_tools.dist_reader import EMBEDDING, FINAL_NORM, OUTPUT_LAYER, DistCheckpoint
from megafox.config import ModelConfig
from megafox.model.hf_mapping import hf_layer_to_megatron, megatron_layer_to_hf, pad_vocab

Group = Dict[str, torch.Tensor]

HF_LAYER_NAMES = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                  "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def hf_plan(model: ModelConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """Every HF tensor name and shape, in stream order."""
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    shapes = dict(zip(HF_LAYER_NAMES, [(h,), (q, h), (kv, h), (kv, h), (h, q), (h,), (f, h), (f, h), (h, f)]))
    plan = [("model.embed_tokens.weight", (model.vocab_size, h))]
    for i in range(model.num_layers):
        plan += [(f"model.layers.{i}.{n}", s) for n, s in shapes.items()]
    plan.append(("model.norm.weight", (h,)))
    if not model.tie_word_embeddings:
        plan.append(("lm_head.weight", (model.vocab_size, h)))
    return plan


# ----------------------------------------------------------------------------------------------
# dist checkpoint -> HF groups

def groups_from_checkpoint(ckpt: DistCheckpoint, dtype: Optional[torch.dtype] = None) -> Iterator[Group]:
    """Cast right after reading: the mapping only permutes rows, so it is exact in any dtype
    and moves half the bytes in bf16."""
    model = ckpt.model
    emb = ckpt.read({EMBEDDING: None}, dtype)[EMBEDDING]
    yield {"model.embed_tokens.weight": emb[: model.vocab_size]}
    del emb
    for i in range(model.num_layers):
        yield megatron_layer_to_hf([ckpt.read_layer(i, dtype)], i, model, te_names=ckpt.te_names)
    tail = {"model.norm.weight": ckpt.read({FINAL_NORM: None}, dtype)[FINAL_NORM]}
    if not model.tie_word_embeddings:
        tail["lm_head.weight"] = ckpt.read({OUTPUT_LAYER: None}, dtype)[OUTPUT_LAYER][: model.vocab_size]
    yield tail


def prefetch(groups: Iterator[Group], depth: int = 1) -> Iterator[Group]:
    """Produce the next group in a thread while the caller writes this one (file reads, torch.load
    and the safetensors writes all release the GIL), holding at most `depth` extra groups."""
    import queue
    import threading

    q: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for g in groups:
                if stop.is_set():
                    return
                q.put(g)
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer, e.g. a ToolError
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ----------------------------------------------------------------------------------------------
# HF directory -> groups

class HFWeights:
    """Lazy access to a HF directory's safetensors (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise ToolError(f"{index}: not a safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            bins = list(self.dir.glob("pytorch_model*.bin"))
            raise ToolError(f"{self.dir}: no model.safetensors or model.safetensors.index.json"
                            + (" (only pytorch_model*.bin: re-save it with safe_serialization=True)" if bins else ""))
        self.handles, self.where = {}, {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise ToolError(f"{path}: missing safetensors shard (listed in {index.name})")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise ToolError(f"{path}: unreadable safetensors file ({exc})") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.where[key] = name

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        if name not in self.where:
            return None
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)

    def check(self, model: ModelConfig) -> None:
        """Every tensor a Llama of this config needs is present with the right shape."""
        for name, shape in hf_plan(model):
            got = self.shape(name)
            if got is None:
                raise ToolError(f"{self.dir}: missing tensor {name}")
            if got != shape:
                raise ToolError(f"{self.dir}: tensor {name} has shape {list(got)}, config.json implies {list(shape)}")


def groups_from_hf(weights: HFWeights, model: ModelConfig) -> Iterator[Group]:
    plan = hf_plan(model)
    yield {plan[0][0]: weights.get(plan[0][0]).float()}
    for i in range(model.num_layers):
        yield {f"model.layers.{i}.{n}": weights.get(f"model.layers.{i}.{n}").float() for n in HF_LAYER_NAMES}
    yield {name: weights.get(name).float() for name, _ in plan[1 + 9 * model.num_layers:]}


# ----------------------------------------------------------------------------------------------
# groups -> a TP1/PP1 megatron-core model

@torch.no_grad()
def fill_model(module: torch.nn.Module, model: ModelConfig, groups: Iterator[Group]) -> None:
    """Copy every group into `module` (one GPTModel holding all layers); all params must be set."""
    params = {k: v for k, v in module.state_dict(keep_vars=True).items()
              if not k.endswith("_extra_state") and v is not None}
    te_names = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in params
    filled = set()

    def put(key: str, value: torch.Tensor) -> None:
        target = params[key]
        if tuple(target.shape) != tuple(value.shape):
            raise ToolError(f"{key}: shape {list(value.shape)} does not fit the model's {list(target.shape)}")
        target.copy_(value)
        filled.add(key)

    for group in groups:
        layers = {int(k.split(".")[2]) for k in group if k.startswith("model.layers.")}
        for i in layers:
            for k, v in hf_layer_to_megatron(group, i, model, 1, 0, te_names).items():
                put(f"decoder.layers.{i}.{k}", v)
        if "model.embed_tokens.weight" in group:
            embed = pad_vocab(group["model.embed_tokens.weight"], params["embedding.word_embeddings.weight"].shape[0])
            put("embedding.word_embeddings.weight", embed)
        if "model.norm.weight" in group:
            put("decoder.final_layernorm.weight", group["model.norm.weight"])
        if "lm_head.weight" in group and not model.tie_word_embeddings:
            put("output_layer.weight", pad_vocab(group["lm_head.weight"], params["output_layer.weight"].shape[0]))
    missing = sorted(set(params) - filled)
    if model.tie_word_embeddings and "output_layer.weight" in missing:
        missing.remove("output_layer.weight")  # reads the embedding on a single stage
    if missing:
        raise ToolError(f"weights do not cover the model: missing {missing[:4]}")
