"""Sharding, SLURM-array slices + merge, and resume after a killed run: all byte-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from dp_helpers import write_jsonl
from dp_helpers import REPO, pp, same_files


def _files(tmp_path, corpus, n=6):
    return [write_jsonl(tmp_path / f"in{i:02d}.jsonl", corpus[i::n]) for i in range(n)]


def test_array_tasks_then_merge_identical(tmp_path, corpus, tokenizer):
    files = _files(tmp_path, corpus)
    pp(files, tokenizer, tmp_path / "ref", "--workers", "2")
    out = tmp_path / "arr" / "ds"
    for i in (2, 0, 1):  # any order
        r = pp(files, tokenizer, out, "--array-index", i, "--array-count", 3, "--workers", "1")
        assert f"array task {i}/3" in r.stdout
    assert not os.path.exists(str(out) + ".bin")
    pp(files, tokenizer, out, "--merge")
    assert same_files(tmp_path / "ref", out)
    man = json.loads(open(str(out) + ".manifest.json").read())
    ref = json.loads((tmp_path / "ref.manifest.json").read_text())
    assert (man["documents"], man["tokens"], man["inputs"]) == (ref["documents"], ref["tokens"], ref["inputs"])
    assert not os.path.exists(str(out) + ".shards")


def test_merge_with_missing_shard_fails_clearly(tmp_path, corpus, tokenizer):
    files = _files(tmp_path, corpus, 4)
    pp(files, tokenizer, tmp_path / "x", "--array-index", 0, "--array-count", 2)
    r = pp(files, tokenizer, tmp_path / "x", "--merge", check=False)
    assert r.returncode == 2 and "2 of 4 shards are not finished" in r.stderr and "Traceback" not in r.stderr


def test_rerun_skips_finished_shards(tmp_path, corpus, tokenizer):
    files = _files(tmp_path, corpus, 4)
    pp(files, tokenizer, tmp_path / "ref", "--workers", "1")
    out = tmp_path / "o"
    pp(files, tokenizer, out, "--array-index", 0, "--array-count", 2, "--workers", "1")
    done = str(out) + ".shards/shard-00000.json"
    m0 = os.stat(done).st_mtime_ns
    # a partial file from a killed run: never under a final name, and cleaned up
    partial = str(out) + ".shards/.shard-00002.bin.tmp99999"
    open(partial, "wb").write(b"\x00" * 100)
    r = pp(files, tokenizer, out, "--workers", "2", "--keep-shards", "--progress", "log")
    assert "2 of 4 shards already complete" in r.stderr
    assert os.stat(done).st_mtime_ns == m0 and not os.path.exists(partial)
    assert same_files(tmp_path / "ref", out)
    r = pp(files, tokenizer, out, "--workers", "2")
    assert "up to date" in r.stdout
    # an input changes -> its shard (and only the output) is redone
    write_jsonl(files[1], corpus[:3])
    pp(files, tokenizer, out, "--workers", "2")
    pp(files, tokenizer, tmp_path / "ref2", "--workers", "1")
    assert same_files(tmp_path / "ref2", out)


def test_resume_after_kill_identical(tmp_path, corpus, tokenizer):
    files = _files(tmp_path, corpus * 3, 12)
    pp(files, tokenizer, tmp_path / "ref", "--workers", "2")
    out = tmp_path / "k" / "ds"
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "data_prep.preprocess", "--input", *files, "--tokenizer", tokenizer,
           "--output-prefix", str(out), "--workers", "2", "--chunk-mb", "0.05", "--progress", "none"]
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    shard_dir = str(out) + ".shards"
    deadline = time.time() + 30
    while time.time() < deadline and p.poll() is None:
        if os.path.isdir(shard_dir) and any(f.endswith(".json") for f in os.listdir(shard_dir)):
            break
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    if os.path.isdir(shard_dir):  # no partial data under a final name: every .bin matches its .idx
        from data_prep.indexed import read_idx

        for f in os.listdir(shard_dir):
            if f.endswith(".bin") and not f.startswith("."):
                dt, lengths, _ = read_idx(os.path.join(shard_dir, f[:-4] + ".idx"))
                assert os.path.getsize(os.path.join(shard_dir, f)) == int(lengths.sum()) * np.dtype(dt).itemsize
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert same_files(tmp_path / "ref", out)
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f]
