"""Write a (sharded) safetensors model one tensor at a time.

The safetensors header lists every tensor's dtype, shape and byte range up front. The exporter
knows all names and shapes from the model config before reading a byte, so the header is written
first and tensors are appended as they are converted: memory holds one tensor, not the model.
Sharding follows transformers: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` once the total passes the shard size.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
INDEX_FILE = "model.safetensors.index.json"


class StreamingSafetensorsWriter:
    """`add(name, tensor)` in exactly the order of `plan` [(name, shape), ...]; then `close()`."""

    def __init__(self, out_dir: Path, plan: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int):
        self.out_dir, self.dtype = Path(out_dir), dtype
        esize = torch.empty((), dtype=dtype).element_size()
        self.plan = [(name, tuple(shape), int(torch.Size(shape).numel()) * esize) for name, shape in plan]
        self.total = sum(n for _, _, n in self.plan)
        shards: List[List[int]] = [[]]
        size = 0
        for i, (_, _, nbytes) in enumerate(self.plan):
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {i: s for s, members in enumerate(shards) for i in members}
        self._next = 0
        self._fh: Optional[BinaryIO] = None
        self._open_shard = -1

    def _open(self, shard: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.shards[shard]:
            name, shape, nbytes = self.plan[i]
            header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._fh = open(self.out_dir / f".{self.files[shard]}.tmp", "wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._open_shard = shard

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, _ = self.plan[self._next]
        if name != expected or tuple(tensor.shape) != shape:
            raise AssertionError(f"writer expected {expected} {list(shape)}, got {name} {list(tensor.shape)}")
        shard = self.shard_of[self._next]
        if shard != self._open_shard:
            self._finish_open_shard()
            self._open(shard)
        data = tensor.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def _finish_open_shard(self) -> None:
        if self._fh is None:
            return
        # No fsync, as save_pretrained: the kernel writes back after we exit (a crash mid-export
        # leaves only the .tmp file, never a truncated shard under the final name).
        self._fh.close()
        self._fh = None
        name = self.files[self._open_shard]
        os.replace(self.out_dir / f".{name}.tmp", self.out_dir / name)

    def close(self) -> List[str]:
        if self._next != len(self.plan):
            raise AssertionError(f"writer closed after {self._next} of {len(self.plan)} tensors")
        self._finish_open_shard()
        index = self.out_dir / INDEX_FILE
        if len(self.files) > 1:
            weight_map = {self.plan[i][0]: self.files[s] for s, members in enumerate(self.shards) for i in members}
            index.write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))
        elif index.exists():
            index.unlink()
        return list(self.files)


def is_weights_file(name: str) -> bool:
    """A file transformers would load weights from (an earlier export's must not mix with ours)."""
    return (fnmatch.fnmatch(name, "model*.safetensors") or name == INDEX_FILE
            or fnmatch.fnmatch(name, "pytorch_model*.bin") or name == "pytorch_model.bin.index.json")
