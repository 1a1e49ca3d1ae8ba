"""HF-named weights as a stream of small groups (embedding, one layer, final norm + head).

Both directions go through the same groups, so peak memory is one group, not one model:
`groups_from_checkpoint` reads a dist checkpoint layer by layer; `groups_from_hf` reads a HF
directory's safetensors lazily; `fill_model` copies groups into a TP1/PP1 megatron-core model.
Names, shapes and the per-layer GQA/SwiGLU mapping come from megafox.model.hf_adapter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from checkpoints_tools.common import ToolError
from megafox.checkpoint.reader import DistCheckpoint
from megafox.config import ModelConfig
from megafox.model.hf_adapter import (
    HF_EMBEDDING, HF_FINAL_NORM, HF_LAYER_TENSORS, HF_LM_HEAD, MCORE_EMBEDDING, MCORE_FINAL_NORM, MCORE_OUTPUT_LAYER,
    hf_layer_index, hf_layer_name, hf_layer_to_megatron, hf_plan, mcore_layer_name, megatron_layer_to_hf, pad_vocab,
    uses_te_names)

Group = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# dist checkpoint -> HF groups

def groups_from_checkpoint(ckpt: DistCheckpoint, dtype: Optional[torch.dtype] = None) -> Iterator[Group]:
    """Cast right after reading: the mapping only permutes rows, so it is exact in any dtype
    and moves half the bytes in bf16."""
    model = ckpt.model
    emb = ckpt.read({MCORE_EMBEDDING: None}, dtype)[MCORE_EMBEDDING]
    yield {HF_EMBEDDING: emb[: model.vocab_size]}
    del emb
    for i in range(model.num_layers):
        yield megatron_layer_to_hf([ckpt.read_layer(i, dtype)], i, model, te_names=ckpt.te_names)
    tail = {HF_FINAL_NORM: ckpt.read({MCORE_FINAL_NORM: None}, dtype)[MCORE_FINAL_NORM]}
    if not model.tie_word_embeddings:
        tail[HF_LM_HEAD] = ckpt.read({MCORE_OUTPUT_LAYER: None}, dtype)[MCORE_OUTPUT_LAYER][: model.vocab_size]
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

    def file_of(self, name: str) -> Path:
        return self.dir / self.where[name]

    def check(self, model: ModelConfig) -> None:
        """Every tensor a Llama of this config needs is present with the right shape."""
        for name, shape in hf_plan(model):
            got = self.shape(name)
            if got is None:
                raise ToolError(f"{self.dir}: missing tensor {name}")
            if got != shape:
                raise ToolError(f"{self.dir}: tensor {name} has shape {list(got)}, config.json implies {list(shape)}")


def groups_from_hf(weights: HFWeights, model: ModelConfig, allow_nonfinite: bool = False) -> Iterator[Group]:
    """The HF weights group by group, as fp32; a NaN/Inf anywhere raises ToolError naming the
    tensor and its file (a model trained from it would only produce NaN), unless allowed."""
    def get(name: str) -> torch.Tensor:
        tensor = weights.get(name).float()
        if not allow_nonfinite:
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            if bad:
                raise ToolError(f"{weights.file_of(name)}: tensor {name} has {bad} NaN/Inf value(s) "
                                f"(refusing to convert it; --allow-nonfinite to convert anyway)")
        return tensor

    yield {HF_EMBEDDING: get(HF_EMBEDDING)}
    for i in range(model.num_layers):
        yield {hf_layer_name(i, n): get(hf_layer_name(i, n)) for n in HF_LAYER_TENSORS}
    yield {name: get(name) for name in ([HF_FINAL_NORM] + ([] if model.tie_word_embeddings else [HF_LM_HEAD]))}


# ----------------------------------------------------------------------------------------------
# groups -> a TP1/PP1 megatron-core model

@torch.no_grad()
def fill_model(module: torch.nn.Module, model: ModelConfig, groups: Iterator[Group]) -> None:
    """Copy every group into `module` (one GPTModel holding all layers); all params must be set."""
    params = {k: v for k, v in module.state_dict(keep_vars=True).items()
              if not k.endswith("_extra_state") and v is not None}
    te_names = uses_te_names(params)
    filled = set()

    def put(key: str, value: torch.Tensor) -> None:
        target = params[key]
        if tuple(target.shape) != tuple(value.shape):
            raise ToolError(f"{key}: shape {list(value.shape)} does not fit the model's {list(target.shape)}")
        target.copy_(value)
        filled.add(key)

    for group in groups:
        layers = {i for i in map(hf_layer_index, group) if i is not None}
        for i in layers:
            for k, v in hf_layer_to_megatron(group, i, model, 1, 0, te_names).items():
                put(mcore_layer_name(i, k), v)
        if HF_EMBEDDING in group:
            put(MCORE_EMBEDDING, pad_vocab(group[HF_EMBEDDING], params[MCORE_EMBEDDING].shape[0]))
        if HF_FINAL_NORM in group:
            put(MCORE_FINAL_NORM, group[HF_FINAL_NORM])
        if HF_LM_HEAD in group and not model.tie_word_embeddings:
            put(MCORE_OUTPUT_LAYER, pad_vocab(group[HF_LM_HEAD], params[MCORE_OUTPUT_LAYER].shape[0]))
    missing = sorted(set(params) - filled)
    if model.tie_word_embeddings and MCORE_OUTPUT_LAYER in missing:
        missing.remove(MCORE_OUTPUT_LAYER)  # reads the embedding on a single stage
    if missing:
        raise ToolError(f"weights do not cover the model: missing {missing[:4]}")
