"""Read a megafox (megatron-core torch_dist) checkpoint tensor by tensor, without a model: the
offline reader of the checkpoint tools (inspect, to-hf, reshard).

dist_checkpointing stores each parameter as one *global* tensor (the TP=1 layout, decoder layers
stacked on a leading axis) cut into the chunks the saving ranks owned. Reading goes through
torch.distributed.checkpoint's FileSystemReader with our own load plan, so one call fetches just
the chunks covering the requested slice (e.g. one layer) and memory stays at that slice.
No process group, no model, works for any TP/PP/VPP the checkpoint was saved with.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megafox.checkpoint.errors import CheckpointError
from megafox.checkpoint.layout import checkpoint_path, read_metadata, read_record
from megafox.config import ModelConfig
from megafox.model.hf_adapter import (MCORE_EMBEDDING, MCORE_FINAL_NORM, MCORE_LAYER_PREFIX, MCORE_MODULE_PREFIXES,
                                      MCORE_OUTPUT_LAYER, layer_names, megatron_global_shapes, uses_te_names)
from megafox.checkpoint.safe_load import SafeFileSystemReader, safe_torch_load

# The global keys this reader asks for (names owned by megafox.model.hf_adapter).
LAYER_PREFIX = MCORE_LAYER_PREFIX
EMBEDDING = MCORE_EMBEDDING
OUTPUT_LAYER = MCORE_OUTPUT_LAYER
FINAL_NORM = MCORE_FINAL_NORM


class _SliceLoadPlanner(LoadPlanner):
    """Loads `{key: (tensor, offsets)}`: each destination tensor is the slice at `offsets`."""

    def __init__(self, targets: Dict[str, Tuple[torch.Tensor, Tuple[int, ...]]]):
        self.targets = targets

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for key, (tensor, offsets) in self.targets.items():
            md = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
            items.extend(create_read_items_for_chunk_list(key, md, [chunk]))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise AssertionError("byte items are never requested")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = self.targets[read_item.dest_index.fqn][0]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, read_item, tensor):
        pass


class _FileSlice(io.RawIOBase):
    """A read-only window [offset, offset + length) of an open file, seekable, for torch.load."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        n = min(len(view), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(view[:n])
        self.pos += got
        return got


def _reason(exc: Exception) -> str:
    """The line of a load error that says what is wrong. torch's weights_only unpickler prefixes
    its complaint about a garbled record with advice to load it unsafely; that part is dropped."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    specific = [l for l in lines if l.startswith(("Unsupported", "Trying", "Can only", "invalid", "PytorchStreamReader"))]
    return (specific or lines or [""])[0][:200]


class DistCheckpoint:
    """One iteration of a megafox checkpoint: its metadata, model config and tensor index."""

    def __init__(self, root: Union[str, Path], iteration: Union[int, str, None] = "latest"):
        try:
            self.path = checkpoint_path(root, iteration)
            self.record = read_record(root, iteration)
            self.meta = read_metadata(root, iteration)  # the record as a mapping, for printing
        except CheckpointError:
            raise
        except (ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{root}: not a megafox checkpoint ({exc})") from None
        if not (self.path / ".metadata").is_file():
            raise CheckpointError(f"{self.path}: no torch_dist '.metadata' file (not a megatron-core dist checkpoint)")
        # `.metadata` is a pickle: read it with the restricted unpickler (a refused class raises
        # UnsafeCheckpointError, one line like any CheckpointError; a corrupt one CheckpointError).
        self.reader = SafeFileSystemReader(str(self.path))
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors: Dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._check_shard_files()
        self.model: ModelConfig = self.record.model  # validated by the record reader
        # Local-spec layers save their norms under TE's names (megatron-core's
        # sharded_state_dict_keys_map), so a checkpoint may use either spelling.
        self.te_names = uses_te_names(self.tensors)
        self.layer_tensors = layer_names(self.te_names).all()

    @property
    def progress(self) -> Dict[str, Any]:
        """Stage and consumed tokens/samples (a model-only checkpoint's: where its weights were)."""
        return {k: v for k, v in self.record.summary().items() if v is not None}

    # -- index -----------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        return self.record.iteration

    def model_keys(self) -> List[str]:
        return sorted(k for k in self.tensors if k.startswith(MCORE_MODULE_PREFIXES))

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def _check_shard_files(self) -> None:
        files = sorted({info.relative_path for info in self.metadata.storage_data.values()})
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.path}: missing shard file(s) {', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''} ({len(missing)} of {len(files)})")
        need_by_file: Dict[str, int] = {}
        for i in self.metadata.storage_data.values():
            need_by_file[i.relative_path] = max(need_by_file.get(i.relative_path, 0), i.offset + i.length)
        for f, need in need_by_file.items():
            size = (self.path / f).stat().st_size
            if size < need:
                raise CheckpointError(f"{self.path / f}: truncated shard file ({size} bytes, index needs {need})")

    # -- reading ---------------------------------------------------------------------------
    def read(self, requests: Dict[str, Optional[int]], dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """`{key: layer or None}` -> `{key: tensor}`; a layer index reads that slice of a stacked tensor.

        A slice stored as one chunk (any layer of a TP1 save, norms at any TP) is returned as the
        loaded chunk itself; only slices spread over several TP chunks are assembled by copying.
        """
        targets, items = {}, {}
        for key, layer in requests.items():
            if key not in self.tensors:
                raise CheckpointError(f"{self.path}: checkpoint has no tensor {key!r}")
            shape = self.shape(key)
            size = shape if layer is None else (1,) + shape[1:]
            offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))
            items[key] = create_read_items_for_chunk_list(key, self.tensors[key], [chunk])
            targets[key] = (size, offsets)
        out = {}
        try:
            for key, reads in items.items():
                size, _ = targets[key]
                parts = [(item, self._load_item(item)) for item in reads]
                if len(parts) == 1 and tuple(parts[0][1].shape) == tuple(size):
                    tensor = parts[0][1]
                else:
                    tensor = torch.empty(size, dtype=self.dtype(key))
                    for item, part in parts:
                        dest = tensor
                        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                            dest = dest.narrow(dim, start, length)
                        dest.copy_(part)
                if requests[key] is not None:
                    tensor = tensor[0]
                out[key] = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
                del parts
        except CheckpointError:
            raise  # already one line naming the file
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: reading {', '.join(requests)[:200]} failed: {exc}") from None
        return out

    def _load_item(self, item: ReadItem) -> torch.Tensor:
        info = self.metadata.storage_data[item.storage_index]
        file = self.path / info.relative_path
        try:
            if info.transform_descriptors:  # compressed/extended storage: let torch's reader decode it
                return self._load_item_via_reader(item)
            with open(file, "rb") as f:
                tensor = safe_torch_load(_FileSlice(f, info.offset, info.length), where=file)
        except CheckpointError:
            raise
        except Exception as exc:  # a corrupt shard: whatever torch's zip/pickle reader trips over
            raise CheckpointError(f"{file}: corrupt or unreadable data for tensor {item.dest_index.fqn} "
                            f"({type(exc).__name__}: {_reason(exc)})") from None
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{file}: entry for {item.dest_index.fqn} holds a {type(tensor).__name__}, not a tensor")
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def _load_item_via_reader(self, item: ReadItem) -> torch.Tensor:
        target = torch.empty(tuple(item.lengths), dtype=self.metadata.state_dict_metadata[item.dest_index.fqn].properties.dtype)

        class _One(_SliceLoadPlanner):
            def resolve_tensor(self, read_item):
                return target

        one = ReadItem(type=item.type, dest_index=item.dest_index, dest_offsets=torch.Size([0] * len(item.lengths)),
                       storage_index=item.storage_index, storage_offsets=item.storage_offsets, lengths=item.lengths)
        self.reader.read_data(LoadPlan([one]), _One({})).wait()
        return target

    def read_layer(self, layer: int, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """One decoder layer, TP=1 layout, named relative to the layer (`hf_adapter.layer_names(self.te_names)`)."""
        got = self.read({LAYER_PREFIX + name: layer for name in self.layer_tensors}, dtype)
        return {k[len(LAYER_PREFIX):]: v for k, v in got.items()}

    # -- validation ------------------------------------------------------------------------
    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Global shapes the model config implies (vocab rows checked separately: they are padded)."""
        return megatron_global_shapes(self.model, self.te_names)

    def validate(self) -> None:
        """Every tensor the config needs is there with the config's shape; else one clear error."""
        where = f"{self.path}"
        for key, shape in self.expected_shapes().items():
            if key not in self.tensors:
                raise CheckpointError(f"{where}: missing tensor {key!r} (saved with a different model spec?)")
            if self.shape(key) != shape:
                raise CheckpointError(f"{where}: tensor {key} has shape {list(self.shape(key))}, but the model config "
                                f"in megafox.json implies {list(shape)} (config/tensor mismatch)")
        heads = [EMBEDDING] if self.model.tie_word_embeddings else [EMBEDDING, OUTPUT_LAYER]
        for key in heads:
            if key not in self.tensors:
                raise CheckpointError(f"{where}: missing tensor {key!r}" + (
                    " (megafox.json says tie_word_embeddings=false)" if key == OUTPUT_LAYER else ""))
            rows, cols = self.shape(key)
            if cols != self.model.hidden_size or rows < self.model.vocab_size:
                raise CheckpointError(f"{where}: tensor {key} has shape {[rows, cols]}, but the model config implies "
                                f"[>= vocab_size {self.model.vocab_size}, hidden_size {self.model.hidden_size}]")
        if self.model.tie_word_embeddings and OUTPUT_LAYER in self.tensors:
            raise CheckpointError(f"{where}: has a separate {OUTPUT_LAYER} but megafox.json says tie_word_embeddings=true")

    def nbytes(self) -> int:
        total = 0
        for key in self.model_keys():
            md = self.tensors[key]
            total += md.size.numel() * torch.empty((), dtype=md.properties.dtype).element_size()
        return total
