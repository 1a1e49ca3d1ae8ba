"""A conversion that fails destroys nothing (issue 17): outputs are built in a temporary sibling
and moved into place only when complete; a training run is never written over unasked; NaN/Inf
HF weights are refused by name."""
import shutil

import torch

from tests.checkpoints_tools.ckpt_tools_helpers import run_tool
from tests.support.processes import assert_one_line_error


def _no_leftovers(output):
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(output.name + "."))


def _corrupt_one_tensor_record(iteration_dir):
    """Overwrite the zip header of one layer tensor's record inside a .distcp shard file."""
    from megafox.checkpoint.safe_load import read_dcp_metadata

    metadata = read_dcp_metadata(iteration_dir)
    idx, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.endswith("linear_fc2.weight"))
    shard = iteration_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset:info.offset + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    return shard


def test_to_hf_with_a_corrupt_shard_leaves_the_previous_export(tiny_converted, tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "hf"
    shutil.copytree(tiny_converted["ckpt"], root)
    shutil.copytree(tiny_converted["export"], out)
    (out / "README.md").write_text("model card\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = _corrupt_one_tensor_record(next(root.glob("iter_*")))
    proc = run_tool("to_hf", "--checkpoint", root, "--output", out, "--no-progress")
    assert_one_line_error(proc, str(shard), "linear_fc2.weight")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte-identical, README included
    assert _no_leftovers(out) == []


def test_to_hf_replaces_an_export_and_keeps_other_files(tiny_converted, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(tiny_converted["export"], out)
    (out / "README.md").write_text("model card\n")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older export")
    proc = run_tool("to_hf", "--checkpoint", tiny_converted["ckpt"], "--output", out, "--dtype", "fp32", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").read_text() == "model card\n"
    assert not (out / "model-00001-of-00002.safetensors").exists()  # never mixed with the new weights
    from safetensors.torch import load_file
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype == torch.float32
    assert _no_leftovers(out) == []


def _live_run(path, latest=40):
    (path / f"iter_{latest:07d}").mkdir(parents=True)
    (path / f"iter_{latest:07d}" / "marker").write_text("weights of step 40")
    (path / "latest").write_text(f"{latest}\n")
    return path


def test_from_hf_refuses_a_training_run_unless_forced(tiny_converted, tmp_path):
    run = _live_run(tmp_path / "run")
    proc = run_tool("from_hf", "--hf", tiny_converted["hf"], "--output", run, "--no-progress")
    assert_one_line_error(proc, str(run), "latest = 40", "--force")
    assert (run / "latest").read_text() == "40\n" and sorted(p.name for p in run.iterdir()) == ["iter_0000040", "latest"]

    proc = run_tool("from_hf", "--hf", tiny_converted["hf"], "--output", run, "--no-progress", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (run / "latest").read_text().strip() == "0" and (run / "iter_0000000" / "megafox.json").is_file()
    assert (run / "iter_0000040" / "marker").read_text() == "weights of step 40"
    assert _no_leftovers(run) == []


def test_from_hf_refuses_nonfinite_weights_and_a_failed_run_moves_nothing(tiny_converted, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(tiny_converted["hf"], hf)
    sd = load_file(str(hf / "model.safetensors"))
    sd["model.layers.2.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    run = _live_run(tmp_path / "run")
    # forced into a live run: refused while streaming, before anything is written
    proc = run_tool("from_hf", "--hf", hf, "--output", run, "--no-progress", "--force")
    assert_one_line_error(proc, "model.layers.2.mlp.up_proj.weight", "NaN", "--allow-nonfinite",
                          str(hf / "model.safetensors"))
    assert (run / "latest").read_text() == "40\n" and sorted(p.name for p in run.iterdir()) == ["iter_0000040", "latest"]
    assert _no_leftovers(run) == []

    proc = run_tool("from_hf", "--hf", hf, "--output", tmp_path / "new", "--no-progress", "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr


def test_reshard_refuses_a_training_run_unless_overwrite(tiny_converted, tmp_path):
    run = _live_run(tmp_path / "run")
    proc = run_tool("reshard", "--checkpoint", tiny_converted["ckpt"], "--tp", 1, "--pp", 1, "--force",
                    "--output", run)
    assert_one_line_error(proc, str(run), "latest = 40", "--overwrite")
    assert (run / "latest").read_text() == "40\n"


def test_staged_export_swap_is_atomic_and_cleans_up(tmp_path):
    """In-process: a failure inside the stage removes the temporary directory and leaves the old
    export; publishing swaps in one step (the old directory is never missing)."""
    import pytest

    from checkpoints_tools.output_dir import StagedExport

    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with StagedExport(out) as staged:
            (staged.path / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("reader died")
    assert (out / "model.safetensors").read_bytes() == b"old" and _no_leftovers(out) == []
    with StagedExport(out) as staged:
        (staged.path / "model.safetensors").write_bytes(b"new")
        staged.publish()
    assert (out / "model.safetensors").read_bytes() == b"new" and _no_leftovers(out) == []
