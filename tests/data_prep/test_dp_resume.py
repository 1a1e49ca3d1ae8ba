"""Sharding, SLURM-array slices + merge, and resume after a killed run: all byte-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from dp_helpers import write_jsonl, write_jsonl_gz
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
    # the job resubmitted (e.g. after a later source failed): merged output is not redone
    r = pp(files, tokenizer, out, "--array-index", 0, "--array-count", 3, "--workers", "1")
    assert "up to date" in r.stdout and not os.path.exists(str(out) + ".shards")


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


def _lines_of_ranges(path, cuts):
    from data_prep.readers import FileReader

    out, ranges = b"", []
    for start, end in zip(cuts, cuts[1:] + [None]):
        r = FileReader(str(path), "jsonl", "text", 1 << 20, start, end)
        out += b"".join(ch[1] for ch in r.chunks())
        ranges.append((r.range_start, r.range_end))
    return out, ranges


def test_byte_ranges_hold_every_line_exactly_once(tmp_path):
    """Cut points at line starts, inside lines, inside a line longer than several ranges, at 0."""
    lines = [b'{"text": "a"}', b"x" * 5000, b"", b'{"text": "' + b"\xc3\xa9" * 300 + b'"}', b"tail no newline"]
    data = b"\n".join(lines)
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    starts = [0] + [i + 1 for i, c in enumerate(data) if c == ord("\n")]
    for cuts in ([0], [0, starts[1]], [0, 3, 100, 200, 300, 5010, starts[3] + 1, len(data) - 2],
                 [0, len(data)], list(range(0, len(data), 7))):
        got, ranges = _lines_of_ranges(path, cuts)
        assert got == data, cuts
        if len(cuts) == 1:
            continue  # [0, EOF): read as a whole file
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
        assert all(r[0] in starts + [len(data)] for r in ranges)  # every range starts at a line


def test_one_huge_file_spreads_over_array_tasks_identically(tmp_path, corpus, tokenizer):
    """--shards K > files cuts a plain .jsonl into byte ranges; 3 array tasks + merge give the
    same bytes, documents, tokens and skip counts as one local run over the whole file."""
    big = tmp_path / "big.jsonl"
    rows = [json.dumps({"text": d}) for d in corpus]
    rows[2], rows[len(rows) // 2] = '{"text": broken', ""  # a skipped record and a blank line
    big.write_text("\n".join(rows))  # no trailing newline
    small = write_jsonl_gz(tmp_path / "small.jsonl.gz", corpus[:3])  # compressed: never cut
    files = [str(big), small]
    pp(files, tokenizer, tmp_path / "ref", "--workers", "2")
    out = tmp_path / "arr" / "ds"
    for i in (1, 2, 0):
        pp(files, tokenizer, out, "--shards", 7, "--array-index", i, "--array-count", 3, "--workers", "2")
    r = pp(files, tokenizer, out, "--shards", 7, "--merge")
    assert same_files(tmp_path / "ref", out)
    man = json.loads(open(str(out) + ".manifest.json").read())
    ref = json.loads((tmp_path / "ref.manifest.json").read_text())
    assert man["shards"] == 7 and ref["shards"] == 2
    for key in ("documents", "tokens", "skipped"):
        assert man[key] == ref[key], key
    assert man["skipped"] == {"malformed_json": 1}
    ranges = [i["range"] for i in man["inputs"] if i["path"] == str(big)]
    assert len(ranges) >= 6 and ranges[0][0] == 0 and ranges[-1][1] == big.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert [i for i in man["inputs"] if i["path"] == small] == [i for i in ref["inputs"] if i["path"] == small]
