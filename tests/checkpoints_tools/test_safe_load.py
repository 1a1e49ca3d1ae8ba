"""Opening a checkpoint never runs code from it (issue 17): DCP's `.metadata` is a pickle, so it
goes through a restricted unpickler; other checkpoint files load with weights_only=True."""
import io
import os
import pickle
import shutil

import pytest
import torch

from megafox.checkpoint.safe_load import (SafeFileSystemReader, UnsafeCheckpointError, load_bytes, read_dcp_metadata, safe_torch_load)
from tests.checkpoints_tools.ckpt_tools_helpers import run_tool
from tests.support.processes import assert_one_line_error


class ShellPayload:
    """What an attacker plants: unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling this creates a file without any shell."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _iteration_dir(root):
    return next(root.glob("iter_*"))


def _plant(iteration_dir, payload):
    """Rewrite `.metadata` as the real metadata carrying `payload` (a checkpoint that otherwise
    looks valid), as a downloaded checkpoint could."""
    metadata = read_dcp_metadata(iteration_dir)
    metadata.planner_data = {"note": payload}
    (iteration_dir / ".metadata").write_bytes(pickle.dumps(metadata))


def test_payload_is_live(tmp_path):
    """The payloads do run under a plain unpickler (what FileSystemReader.read_metadata uses),
    so the tests below can fail."""
    for payload in (ShellPayload(tmp_path / "a"), OpenPayload(tmp_path / "b")):
        pickle.loads(pickle.dumps(payload))
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_tools_refuse_planted_metadata_and_run_nothing(tiny_converted, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_converted["ckpt"], root)
    marker = tmp_path / "PWNED"
    _plant(_iteration_dir(root), ShellPayload(marker))
    metadata_file = _iteration_dir(root) / ".metadata"
    for proc in (run_tool("inspect", "--checkpoint", root),
                 run_tool("to_hf", "--checkpoint", root, "--output", tmp_path / "hf", "--no-progress", "--verify")):
        assert_one_line_error(proc, str(metadata_file), "posix.system", "refused")
        assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_restricted_unpickler_refuses_by_name(tiny_converted, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_converted["ckpt"], root)
    it = _iteration_dir(root)
    marker = tmp_path / "created"
    (it / ".metadata").write_bytes(pickle.dumps(OpenPayload(marker)))  # the payload as the whole file
    with pytest.raises(UnsafeCheckpointError) as err:
        read_dcp_metadata(it)
    assert err.value.name == "io.open" and err.value.path == str(it / ".metadata")
    with pytest.raises(UnsafeCheckpointError):
        SafeFileSystemReader(str(it)).read_metadata()
    assert not marker.exists()
    # protocol-4 dotted names reach attributes through an admitted class: refused too
    name = b"Size.__class__"
    dotted = b"\x80\x04\x8c\x05torch\x8c" + bytes([len(name)]) + name + b"\x93."  # STACK_GLOBAL
    (it / ".metadata").write_bytes(dotted)
    with pytest.raises(UnsafeCheckpointError, match="torch.Size.__class__"):
        read_dcp_metadata(it)


def test_real_training_checkpoint_reads_the_same(training_checkpoint, tmp_path):
    """Everything in a real training checkpoint (model, optimizer, RNG) is admitted: the safe
    metadata equals torch's own unpickling, the RNG ShardedObject and common.pt load as
    weights_only data; a payload in a ShardedObject is refused."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megafox.checkpoint.reader import DistCheckpoint

    it = _iteration_dir(training_checkpoint)
    ours, theirs = read_dcp_metadata(it), FileSystemReader(str(it)).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data and ours.planner_data == theirs.planner_data
    assert any(k.startswith("optimizer") for k in ours.state_dict_metadata)

    rng = [(idx, info) for idx, info in ours.storage_data.items() if idx.fqn.startswith("rng_state")]
    assert rng and isinstance(ours.state_dict_metadata[rng[0][0].fqn], BytesStorageMetadata)
    with open(it / rng[0][1].relative_path, "rb") as f:
        f.seek(rng[0][1].offset)
        state = load_bytes(io.BytesIO(f.read(rng[0][1].length)))
    state = state[0] if isinstance(state, list) else state
    assert set(state) >= {"python", "numpy", "torch", "tracker"}
    assert "optimizer" in safe_torch_load(it / "common.pt")

    marker = tmp_path / "PWNED"
    planted = io.BytesIO()
    torch.save({"rng": ShellPayload(marker)}, planted)
    planted.seek(0)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_bytes(planted, where="rng_state")
    assert not marker.exists()

    # DCP's own load machinery with the safe reader and planner (what the trainer's resume wires in)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from megafox.checkpoint.safe_load import SafeLoadBytesMixin

    class SafePlanner(SafeLoadBytesMixin, DefaultLoadPlanner):
        pass

    key = rng[0][0].fqn
    loaded = {key: io.BytesIO()}
    dcp.load(loaded, storage_reader=SafeFileSystemReader(str(it)), planner=SafePlanner(allow_partial_load=True))
    got = loaded[key][0] if isinstance(loaded[key], list) else loaded[key]
    assert torch.equal(got["torch"], state["torch"])

    ckpt = DistCheckpoint(training_checkpoint)  # the tools' reader on it
    assert ckpt.progress["stage"] == "stage1" and ckpt.read_layer(0)
