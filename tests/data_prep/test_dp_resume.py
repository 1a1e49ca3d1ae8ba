"""Sharding, SLURM-array slices + merge, and resume after a killed run: all byte-identical."""

import json
import os
import signal
import subprocess
import time

import numpy as np

from tests.data_prep.dp_helpers import lock_held_elsewhere, pp, same_files, write_jsonl, write_jsonl_gz
from tests.support.processes import REPO, clean_env, ctrl_c_reaches_it, python_command, run_command


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
    cmd = python_command("-m", "data_prep.preprocess", "--input", *files, "--tokenizer", tokenizer,
                         "--output-prefix", out, "--workers", "2", "--chunk-mb", "0.05", "--progress", "none")
    p = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
        from megafox.formats.indexed import read_idx

        for f in os.listdir(shard_dir):
            if f.endswith(".bin") and not f.startswith("."):
                dt, lengths, _ = read_idx(os.path.join(shard_dir, f[:-4] + ".idx"))
                assert os.path.getsize(os.path.join(shard_dir, f)) == int(lengths.sum()) * np.dtype(dt).itemsize
    r = run_command(cmd)
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


# ---------------------------------------------------------------------------------------
# Leftovers of a killed merge, the merge lock, and Ctrl-C


def _shards_then_ref(tmp_path, corpus, tokenizer, out, n=3):
    """Inputs, their finished shards under out.shards/ (an array task over all of them) and a
    clean uninterrupted run of the same inputs at tmp_path/ref to compare against."""
    files = _files(tmp_path, corpus, n)
    pp(files, tokenizer, tmp_path / "ref", "--workers", "1")
    pp(files, tokenizer, out, "--array-index", 0, "--array-count", 1, "--workers", "1")
    return files


def _dead_pid():
    p = subprocess.Popen(python_command("-c", "pass"))
    p.wait()
    return p.pid


def _leftovers(d):
    return sorted(f for f in os.listdir(d) if ".tmp" in f or f.endswith(".lock"))


def test_merge_removes_temporaries_of_killed_writers(tmp_path, corpus, tokenizer):
    """A finalize killed mid-write leaves .PREFIX.bin.tmp<pid> (and .PREFIX.manifest.json.XXXXXXXX.tmp
    from the atomic manifest write). The next merge holds the prefix's lock, so every one of them is
    stale whether its pid is alive or not; another prefix's temporaries are not touched."""
    out = tmp_path / "o" / "ds"
    files = _shards_then_ref(tmp_path, corpus, tokenizer, out)
    alive = subprocess.Popen(["sleep", "60"])  # a live pid that does not hold the lock
    try:
        stale = [f".ds.bin.tmp{alive.pid}", f".ds.idx.tmp{_dead_pid()}", ".ds.manifest.json.k3x_9q0z.tmp"]
        others = [f".ds.v2.bin.tmp{_dead_pid()}", ".ds.v2.manifest.json.abcdefgh.tmp", "ds.bin.tmp-notes"]
        for name in stale + others:
            (out.parent / name).write_bytes(b"\x07" * 1000)
        r = pp(files, tokenizer, out, "--merge")
        assert "removed 3 temporary file(s) of an interrupted run" in r.stderr
        assert same_files(tmp_path / "ref", out)
        assert sorted(os.listdir(out.parent)) == sorted(others + ["ds.bin", "ds.idx", "ds.manifest.json"])
    finally:
        alive.kill()
        alive.wait()


def test_stale_temporaries_without_a_lock_only_dead_pids(tmp_path):
    """Where the filesystem has no locks, only temporaries whose writer is gone from this host go."""
    from data_prep.common import remove_stale_temporaries

    alive = subprocess.Popen(["sleep", "60"])
    try:
        keep = [f".ds.bin.tmp{alive.pid}", f".ds.bin.tmp{os.getpid()}", ".ds.manifest.json.k3x_9q0z.tmp"]
        gone = [f".ds.bin.tmp{_dead_pid()}", f".ds.idx.tmp{_dead_pid()}"]
        for name in keep + gone:
            (tmp_path / name).write_bytes(b"x")
        removed = remove_stale_temporaries([str(tmp_path / "ds.bin"), str(tmp_path / "ds.idx"),
                                            str(tmp_path / "ds.manifest.json")], writers_locked_out=False)
        assert sorted(os.path.basename(p) for p in removed) == sorted(gone)
        assert sorted(os.listdir(tmp_path)) == sorted(keep)
    finally:
        alive.kill()
        alive.wait()


def test_sigkill_during_merge_then_rerun_identical(tmp_path, corpus, tokenizer):
    """Kill -9 a real `--merge` while its .PREFIX.bin.tmp<pid> exists: the middle shard's .bin is a
    FIFO (an input file with no valid record makes a 0-token shard, so it still counts as complete),
    which holds the merge inside the copy for as long as the test wants. The rerun removes the
    leftover and writes the same bytes as a clean run."""
    files = _files(tmp_path, corpus, 3)
    files[1] = write_jsonl(tmp_path / "in01.jsonl", ["", "   \n"])  # skipped as empty: a 0-token shard
    pp(files, tokenizer, tmp_path / "ref", "--workers", "1")
    out = tmp_path / "o" / "ds"
    pp(files, tokenizer, out, "--array-index", 0, "--array-count", 1, "--workers", "1")
    middle = str(out) + ".shards/shard-00001"
    assert json.load(open(middle + ".json"))["tokens"] == 0
    os.unlink(middle + ".bin")
    os.mkfifo(middle + ".bin")
    cmd = python_command("-m", "data_prep.preprocess", "--input", *files, "--tokenizer", tokenizer,
                         "--output-prefix", out, "--merge", "--progress", "none")
    p = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out.parent / f".ds.bin.tmp{p.pid}"
    deadline = time.time() + 60
    while not tmp.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert tmp.exists(), "the merge never started"
    time.sleep(0.2)
    assert p.poll() is None  # still inside the merge, blocked on the FIFO
    p.kill()
    p.wait()
    assert tmp.exists() and not os.path.exists(str(out) + ".bin")  # what the issue reported
    os.unlink(middle + ".bin")
    open(middle + ".bin", "wb").close()  # the 0-token shard's real content
    r = pp(files, tokenizer, out, "--merge")
    assert f"removed 1 temporary file(s) of an interrupted run: .ds.bin.tmp{p.pid}" in r.stderr
    assert same_files(tmp_path / "ref", out)
    assert _leftovers(out.parent) == [] and not os.path.exists(str(out) + ".shards")


def test_merge_refuses_while_another_writer_holds_the_lock(tmp_path, corpus, tokenizer):
    out = tmp_path / "o" / "ds"
    files = _shards_then_ref(tmp_path, corpus, tokenizer, out)
    with lock_held_elsewhere(out) as holder:
        (out.parent / f".ds.bin.tmp{holder.pid}").write_bytes(b"in progress")
        r = pp(files, tokenizer, out, "--merge", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"error: {out}: another process (pid {holder.pid} on " in r.stderr
        assert "is writing it now" in r.stderr.strip().splitlines()[-1]
        assert (out.parent / f".ds.bin.tmp{holder.pid}").read_bytes() == b"in progress"
        assert not os.path.exists(str(out) + ".bin")
    pp(files, tokenizer, out, "--merge")  # the holder died: its lock went with it
    assert same_files(tmp_path / "ref", out) and _leftovers(out.parent) == []


def _as_under_a_launcher() -> None:
    ctrl_c_reaches_it()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _interrupt_when_a_shard_is_done(cmd, shard_dir):
    """Start cmd in a session of its own and Ctrl-C it (SIGINT to the whole process group, as a
    terminal does) once the first shard is finished and more remain."""
    # with SIGTERM blocked, as a launcher holding its stop signals leaves it: the pool's workers
    # inherit the mask and must still stop when the interrupted parent terminates them
    p = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,
                         preexec_fn=_as_under_a_launcher)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if os.path.isdir(shard_dir) and any(f.endswith(".json") for f in os.listdir(shard_dir)):
            break
        time.sleep(0.005)
    assert p.poll() is None, "finished before the interrupt"
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    return p.returncode, stdout, stderr


def _assert_clean_interrupt(rc, stderr, out_dir, shard_dir):
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun to continue: finished shards are kept"
    assert not [f for f in os.listdir(out_dir) if f.endswith((".bin", ".idx", ".manifest.json"))]
    left = os.listdir(shard_dir)
    assert not [f for f in left if f.startswith(".")], left  # no temporaries, no worker spill directory
    from megafox.formats.indexed import read_idx

    finished = [f for f in left if f.endswith(".json")]
    assert finished and all(f[:-5] + ".bin" in left for f in finished)
    for f in left:  # a .bin under its final name is complete: it matches its .idx
        if f.endswith(".bin"):
            dt, lengths, _ = read_idx(os.path.join(shard_dir, f[:-4] + ".idx"))
            assert os.path.getsize(os.path.join(shard_dir, f)) == int(lengths.sum()) * np.dtype(dt).itemsize
    return finished


def test_ctrl_c_preprocess_one_line_then_rerun_continues(tmp_path, corpus, tokenizer):
    files = _files(tmp_path, corpus * 3, 12)
    pp(files, tokenizer, tmp_path / "ref", "--workers", "2")
    out = tmp_path / "c" / "ds"
    cmd = python_command("-m", "data_prep.preprocess", "--input", *files, "--tokenizer", tokenizer,
                         "--output-prefix", out, "--workers", "2", "--chunk-mb", "0.05", "--progress", "none")
    rc, _, stderr = _interrupt_when_a_shard_is_done(cmd, str(out) + ".shards")
    finished = _assert_clean_interrupt(rc, stderr, out.parent, str(out) + ".shards")
    r = pp(files, tokenizer, out, "--workers", "2", "--progress", "log")
    assert f"{len(finished)} of 12 shards already complete" in r.stderr
    assert same_files(tmp_path / "ref", out)


def test_ctrl_c_plan_one_line_then_rerun_continues(tmp_path, corpus, tokenizer):
    import yaml

    files = _files(tmp_path, corpus * 3, 12)
    pp(files, tokenizer, tmp_path / "ref", "--workers", "2")
    plan = {"output_dir": str(tmp_path / "data"), "tokenizer": {"model": tokenizer},
            "preprocess": {"workers": 2, "chunk_mb": 0.05},
            "stages": {"stage1": {"token_budget": 1000, "sources": [
                {"name": "web", "globs": [str(tmp_path / "in*.jsonl")], "weight": 1.0}]}}}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    cmd = python_command("-m", "data_prep.plan", "--plan", tmp_path / "plan.yaml")
    stage = tmp_path / "data" / "stage1"
    rc, _, stderr = _interrupt_when_a_shard_is_done(cmd, str(stage / "web.shards"))
    _assert_clean_interrupt(rc, stderr, stage, str(stage / "web.shards"))
    assert not (stage / "blend.json").exists()
    r = run_command(cmd, timeout=300)
    assert r.returncode == 0, r.stderr
    assert same_files(tmp_path / "ref", stage / "web") and (stage / "blend.json").exists()
