"""A resume never runs code planted in a checkpoint (issue 17 item 2, trainer side).

Each test plants a pickle whose unpickling would run a shell command (creating a marker file) in
the newest checkpoint of a real training run, in one of the three pickled things a resume opens:
DCP's `.metadata` index, megatron-core's `common.pt`, and a ShardedObject inside a shard file (the
RNG state, which DCP itself unpickles with weights_only=False). The attacker is assumed to update
the digests in megafox.json too, so integrity checking alone would not stop it. The trainer falls
back to the previous checkpoint naming the file (index files, checked before loading) or stops
with one line naming the object (exit 2), and the command never runs."""
import json
import pickle
import shutil

import pytest
import torch

from megafox.checkpoint.integrity import digest
from megafox.checkpoint.safe_load import read_dcp_metadata
from tests.training.harness import faulty_trainer, latest, losses, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
INTERVAL = ["checkpoint.interval=2"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def killed(tiny_data, tmp_path_factory):
    """stage1 on DP2 saved at iterations 2 and 4, killed -9 at the start of step 6; and the
    losses of the same run uninterrupted."""
    root = tmp_path_factory.mktemp("killed") / "ckpt"
    rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL, env=faulty_trainer("--kill-at-step", "6"))
    assert rc != 0 and latest(root) == 4, out[-3000:]
    straight = tmp_path_factory.mktemp("straight") / "ckpt"
    rc, out = run_stage("stage1", straight, tiny_data, overrides=INTERVAL)
    assert rc == 0, out[-3000:]
    return root, losses(straight, "stage1")


def _redigest(iteration_dir, name):
    """What an attacker would do so that the integrity check passes: record the new digest."""
    meta = iteration_dir / "megafox.json"
    record = json.loads(meta.read_text())
    record["files"][name] = digest(iteration_dir / name)
    meta.write_text(json.dumps(record))


def _plant_common(it, marker):
    common = torch.load(it / "common.pt", weights_only=True)
    common["planted"] = Payload(marker)
    torch.save(common, it / "common.pt")
    return "common.pt"


def _plant_metadata(it, marker):
    with open(it / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    return ".metadata"


@pytest.mark.parametrize("plant", [_plant_common, _plant_metadata], ids=["common.pt", ".metadata"])
def test_a_planted_index_file_is_skipped_by_name_and_never_run(killed, tiny_data, tmp_path, plant):
    source, straight = killed
    root, marker = tmp_path / "ckpt", tmp_path / "pwned"
    shutil.copytree(source, root)
    name = plant(root / "iter_0000004", marker)
    _redigest(root / "iter_0000004", name)
    rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL)
    assert rc == 0, out[-4000:]
    assert f"skipping an unusable checkpoint: iteration 4: {root / 'iter_0000004' / name}: refused to load: " \
           f"it references posix.system" in out
    assert f"resumed from {root / 'iter_0000002'}" in out
    assert losses(root, "stage1") == straight
    assert not marker.exists()


def test_a_planted_shard_object_stops_the_resume_in_one_line_and_never_runs(killed, tiny_data, tmp_path):
    source, _ = killed
    root, marker = tmp_path / "ckpt", tmp_path / "pwned"
    shutil.copytree(source, root)
    it = root / "iter_0000004"
    metadata = read_dcp_metadata(it)
    (index, info), = [(i, s) for i, s in metadata.storage_data.items()
                      if i.fqn.startswith("rng_state") and s.relative_path.startswith("__0_")]
    payload = pickle.dumps(Payload(marker), protocol=2)  # what unpickling the item would start with
    assert len(payload) < info.length
    with open(it / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(payload)
    _redigest(it, info.relative_path)
    rc, out = run_stage("stage1", root, tiny_data, overrides=INTERVAL)
    assert rc == 2, out[-4000:]
    errors = [line for line in out.splitlines() if "megafox-train: error:" in line]
    assert len(errors) == 1 and f"{index.fqn}: refused to load: it references posix.system" in errors[0], errors
    assert "Traceback" not in out
    assert not marker.exists()
