"""Open checkpoint files without running code from them.

torch.distributed.checkpoint keeps a checkpoint's index in `.metadata`, a plain pickle, and
`FileSystemReader.read_metadata` unpickles it with `pickle.load`: a downloaded checkpoint whose
`.metadata` reduces to `os.system(...)` runs that command the moment a tool or the trainer opens
it. Here the index goes through an unpickler that admits only what DCP metadata is made of (the
idea of torch's `weights_only`), and every other `torch.load` of a checkpoint file is
`weights_only=True`. Anything else is refused by name with `UnsafeCheckpointError`, before it is
called or even imported.

What a megafox checkpoint's `.metadata` holds (found by unpickling real ones, model-only and
training with optimizer and RNG state, with a logging unpickler): the dataclasses and enums of
`torch.distributed.checkpoint.{metadata,planner,filesystem}` (Metadata, TensorStorageMetadata,
BytesStorageMetadata, ChunkStorageMetadata, TensorProperties, _MEM_FORMAT_ENCODING, MetadataIndex,
StorageMeta, _StorageInfo, SavePlan, WriteItem, WriteItemType, TensorWriteData), `torch.Size`,
torch dtypes and `torch.serialization._get_layout` (how torch pickles a layout). megatron-core adds
no classes of its own there (its extra facts go to `metadata.json`, which is JSON).
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megafox.checkpoint.errors import CheckpointError

METADATA_FILE = ".metadata"

# Modules whose dataclasses and enums make up DCP metadata: plain data holders, built by pickle
# without running anything of the file's choosing.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_EXACT = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # torch.layout's reducer
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names something other than plain data; it was not loaded."""

    def __init__(self, path: Union[str, Path], name: str):
        self.path, self.name = str(path), name
        super().__init__(f"{path}: refused to load: it references {name}, which is not checkpoint data "
                         f"(unpickling it could run code from the file)")

    def __reduce__(self):
        # torch.distributed.checkpoint pickles one rank's failure to the others: rebuild from both fields
        return type(self), (self.path, self.name)


def _admitted(module: str, name: str) -> Optional[Any]:
    """The object a pickle may reference as `module.name`, or None when it is not data."""
    if (module, name) in _EXACT:
        return _EXACT[(module, name)]
    if "." in name:  # protocol 4 dotted names reach attributes of attributes
        return None
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, torch.dtype) else None
    if module in _DCP_MODULES:
        value = getattr(importlib.import_module(module), name, None)
        if isinstance(value, type) and value.__module__ == module and (
                dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
            return value
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; refuses any other global with UnsafeCheckpointError."""

    def __init__(self, file: BinaryIO, path: Union[str, Path]):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        value = _admitted(module, name)
        if value is None:
            raise UnsafeCheckpointError(self.path, f"{module}.{name}")
        return value

    def persistent_load(self, pid: Any) -> Any:  # tensor storages never occur in metadata
        raise UnsafeCheckpointError(self.path, f"a persistent reference ({str(pid)[:40]})")


def read_dcp_metadata(checkpoint_dir: Union[str, Path], rank: Optional[int] = None) -> Metadata:
    """A torch_dist checkpoint's `.metadata` (or `__<rank>.metadata`), unpickled safely."""
    path = Path(checkpoint_dir) / (METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
    try:
        with open(path, "rb") as f:
            metadata = RestrictedUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (not a torch_dist checkpoint)") from None
    except Exception as exc:  # truncated or corrupt pickle
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with `.metadata` read by `read_dcp_metadata`, read once and cached
    (as megatron-core's CachedMetadataFileSystemReader: its load asks for the metadata twice).

    Tensor data is already read with `torch.load(weights_only=True)` by FileSystemReader itself.
    Non-tensor items (megatron-core's ShardedObjects) are unpickled by the *load planner*
    (DCP's DefaultLoadPlanner.load_bytes, weights_only=False): use `SafeLoadBytesMixin` there.
    """

    def __init__(self, path: Union[str, os.PathLike], *args: Any, **kwargs: Any):
        super().__init__(path, *args, **kwargs)
        self._metadata: Optional[Metadata] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None:
            metadata = read_dcp_metadata(self.path, rank)
        else:
            if self._metadata is None:
                self._metadata = read_dcp_metadata(self.path)
            metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def reset(self, checkpoint_id: Union[str, os.PathLike, None] = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._metadata = None


_GLOBAL_IN_TORCH_ERROR = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(path_or_file: Union[str, Path, BinaryIO], where: Union[str, Path, None] = None) -> Any:
    """`torch.load(weights_only=True, map_location="cpu")`; a refused global raises
    UnsafeCheckpointError naming `where` (default: the path) and the global."""
    where = where if where is not None else (path_or_file if isinstance(path_or_file, (str, Path)) else "checkpoint file")
    try:
        return torch.load(path_or_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights_only unpickler names a refused global; any other complaint of it
        # ("Unsupported operand 255") means a corrupt file and is the caller's to report
        found = _GLOBAL_IN_TORCH_ERROR.search(str(exc))
        if found:
            raise UnsafeCheckpointError(where, found.group(1)) from None
        raise


def load_bytes(value: io.BytesIO, where: Union[str, Path] = "checkpoint object") -> Any:
    """A non-tensor checkpoint item (a ShardedObject such as the RNG state or `_extra_state`),
    loaded as `weights_only` data. For a load planner's `load_bytes`, in place of DCP's
    `torch.load(value, weights_only=False)`. The RNG state holds numpy arrays, which torch admits
    once megatron-core has registered its safe globals (on import)."""
    import megatron.core  # noqa: F401

    return safe_torch_load(value, where)


class SafeLoadBytesMixin:
    """Put in front of a DCP DefaultLoadPlanner subclass (megatron-core's MCoreLoadPlanner) so its
    non-tensor items load as `weights_only` data: `class P(SafeLoadBytesMixin, MCoreLoadPlanner)`.
    Same placement as DefaultLoadPlanner.load_bytes; only the unpickling differs."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = load_bytes(value, where=read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
