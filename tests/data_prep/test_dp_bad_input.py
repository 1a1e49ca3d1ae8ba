"""Bad input never crashes and never loses a good record; skips are counted by reason."""

import gzip
import json
import os
import signal

from tests.data_prep.dp_helpers import pp, same_files, write_jsonl
from tests.support.indexed import read_indexed
from tests.support.processes import assert_one_line_error, run_module
from tests.support.tokenizers import encode_documents


def test_bad_records_counted_good_kept(tmp_path, corpus, tokenizer, sp):
    good = corpus[:12]
    lines = []
    bad = {"malformed_json": 0, "missing_key": 0, "not_string": 0, "invalid_utf8": 0, "empty": 0, "not_object": 0}
    for i, d in enumerate(good):
        lines.append(json.dumps({"text": d}).encode())
        k = i % 6
        if k == 0:
            lines.append(b'{"text": "unterminated'); bad["malformed_json"] += 1
        elif k == 1:
            lines.append(json.dumps({"content": "no text key"}).encode()); bad["missing_key"] += 1
        elif k == 2:
            lines.append(json.dumps({"text": 42}).encode()); bad["not_string"] += 1
        elif k == 3:
            lines.append(b'{"text": "bad \xff\xfe bytes"}'); bad["invalid_utf8"] += 1
        elif k == 4:
            lines.append(json.dumps({"text": "   \n"}).encode()); bad["empty"] += 1
        else:
            lines.append(b"[1, 2, 3]"); bad["not_object"] += 1
    lines.append(b"")  # blank line: not a record
    lines.append(b'{"text": "lone surrogate \\ud800 here"}'); bad["invalid_utf8"] += 1
    lines.append(json.dumps({"text": "last line without newline"}).encode())
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines))
    for w in ("1", "2"):
        r = pp(tmp_path / "bad.jsonl", tokenizer, tmp_path / f"o{w}", "--workers", w, "--chunk-mb", "0.02")
        docs, _ = read_indexed(tmp_path / f"o{w}")
        assert docs == encode_documents(sp, good + ["last line without newline"])
        man = json.loads((tmp_path / f"o{w}.manifest.json").read_text())
        assert man["skipped"] == bad and man["skipped_total"] == sum(bad.values())
        ex = man["skipped_examples"][0]
        assert ex == {"reason": "malformed_json", "file": str(tmp_path / "bad.jsonl"), "line": 2}
        assert "skipped malformed_json at " + str(tmp_path / "bad.jsonl") + ":2" in r.stderr
        assert "skipped 13" in r.stdout


def test_truncated_gzip_keeps_complete_records(tmp_path, corpus, tokenizer, sp):
    docs, tail = corpus[:30], corpus[30:35]
    blob = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(blob[: len(blob) * 2 // 3])
    good = write_jsonl(tmp_path / "u.jsonl", tail)
    pp([tmp_path / "t.jsonl.gz", good], tokenizer, tmp_path / "o", "--workers", "2")
    out, _ = read_indexed(tmp_path / "o")
    # every complete line before the cut survives, in order; the second file is untouched
    n_complete = len(out) - len(tail)
    assert 10 <= n_complete < len(docs)
    assert out == encode_documents(sp, docs[:n_complete] + tail)
    man = json.loads((tmp_path / "o.manifest.json").read_text())
    assert man["skipped"] == {"truncated_file": 1}
    assert man["skipped_examples"][0]["line"] == n_complete + 1


def test_garbage_zst_and_gz_do_not_crash(tmp_path, corpus, tokenizer, sp):
    (tmp_path / "x.jsonl.zst").write_bytes(b"not zstd at all" * 10)
    (tmp_path / "y.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    good = write_jsonl(tmp_path / "z.jsonl", corpus[:3])
    pp([tmp_path / "x.jsonl.zst", tmp_path / "y.jsonl.gz", good], tokenizer, tmp_path / "o", "--workers", "1")
    out, _ = read_indexed(tmp_path / "o")
    assert out == encode_documents(sp, corpus[:3])
    man = json.loads((tmp_path / "o.manifest.json").read_text())
    assert man["skipped"] == {"corrupt_file": 2}


def test_parquet_bad_values(tmp_path, tokenizer, sp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok one", None, "", "ok two"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "b.parquet")
    pp([tmp_path / "a.parquet", tmp_path / "b.parquet"], tokenizer, tmp_path / "o", "--workers", "1")
    out, _ = read_indexed(tmp_path / "o")
    assert out == encode_documents(sp, ["ok one", "ok two"])
    man = json.loads((tmp_path / "o.manifest.json").read_text())
    assert man["skipped"] == {"empty": 1, "missing_key": 2, "not_string": 1}


def test_missing_input_fails_fast(tmp_path, tokenizer):
    r = pp(tmp_path / "nope.jsonl", tokenizer, tmp_path / "o", check=False)
    assert r.returncode == 2 and "nope.jsonl: no such file" in r.stderr and "Traceback" not in r.stderr
    r = pp(str(tmp_path / "none*.jsonl"), tokenizer, tmp_path / "o", check=False)
    assert r.returncode == 2 and "matches no file" in r.stderr


def test_unreadable_tokenizer_fails_fast(tmp_path, corpus):
    f = write_jsonl(tmp_path / "a.jsonl", corpus[:2])
    (tmp_path / "bad.model").write_bytes(b"this is not a model")
    for tok, msg in ((tmp_path / "bad.model", "not a SentencePiece model"),
                     (tmp_path / "missing.model", "no such file")):
        r = pp(f, tok, tmp_path / "o", check=False)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.bin").exists()


def test_io_error_mid_file_fails_the_shard_and_a_rerun_retries_it(tmp_path, corpus, tokenizer, monkeypatch):
    """An I/O error is not bad data: no record is silently dropped and no shard completes with
    part of its file; the run fails with the file named, and the next run redoes that shard."""
    import pytest

    from data_prep import readers
    from data_prep.common import DataPrepError
    from data_prep.preprocess import Options, preprocess

    files = [write_jsonl(tmp_path / f"in{i}.jsonl", corpus[i::2] * 4) for i in range(2)]
    pp(files, tokenizer, tmp_path / "ref", "--workers", "1")
    raw = readers.FileReader._raw

    def failing(self, f):
        gen = raw(self, f)
        yield next(gen)
        if self.path == files[1]:
            raise OSError(5, "Input/output error")
        yield from gen
    monkeypatch.setattr(readers, "READ_BLOCK", 4096)
    monkeypatch.setattr(readers.FileReader, "_raw", failing)
    out = tmp_path / "o" / "ds"
    opts = Options(files, tokenizer, str(out), workers=1, chunk_bytes=4096, progress="none", quiet=True)
    with pytest.raises(DataPrepError, match=rf"{files[1]}: read error \(\[Errno 5\] Input/output error\)"):
        preprocess(opts)
    shards = tmp_path / "o" / "ds.shards"
    assert (shards / "shard-00000.json").exists() and not (shards / "shard-00001.json").exists()
    assert not (tmp_path / "o" / "ds.bin").exists()
    monkeypatch.undo()
    pp(files, tokenizer, out, "--workers", "1")
    assert same_files(tmp_path / "ref", out)


# ---------------------------------------------------------------------------------------
# Unwritable or full output: one line naming the path and the reason, exit 2, nothing lost


def _pp_limited(inputs, tokenizer, prefix, *extra, fsize):
    """The CLI as a user runs it, with a file-size limit standing in for a full disk: a write past
    it fails with EFBIG (Python ignores SIGXFSZ), as one past the end of the disk fails ENOSPC."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        # started the way a launcher that holds its stop signals starts it: the workers inherit a
        # blocked SIGTERM, and the failed run must still stop them (it used to wait for them forever)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    return pp(inputs, tokenizer, prefix, *extra, check=False, preexec_fn=limit)


def _read_only(path):
    """Make a directory unwritable even for root (chattr +i, else a read-only tmpfs mounted over
    it) or, as a user, by its mode; the undo function restores it so that pytest can clean up."""
    import os
    import subprocess

    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if r.returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    # filesystems without the immutable flag (overlayfs, tmpfs): root may still mount
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    assert m.returncode == 0, (f"running as root, and neither chattr +i ({r.stderr!r}) nor a read-only tmpfs "
                               f"mount ({m.stderr!r}) can make {path} unwritable")
    return lambda: subprocess.run(["umount", str(path)], check=True)


def test_unwritable_output_fails_before_any_work(tmp_path, corpus, tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", corpus[:3])
    (tmp_path / "afile").write_text("not a directory")
    r = pp(f, tokenizer, tmp_path / "afile" / "sub" / "ds", check=False)
    assert_one_line_error(r, f"--output-prefix {tmp_path / 'afile' / 'sub' / 'ds'}: cannot create directory "
                             f"{tmp_path / 'afile' / 'sub'} (Not a directory)")

    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _read_only(ro)
    try:
        r = pp(f, tokenizer, ro / "ds", check=False)
        line = assert_one_line_error(r, f"--output-prefix {ro / 'ds'}: cannot write in {ro} (")
        assert line.endswith(("(Permission denied)", "(Operation not permitted)", "(Read-only file system)")), line
        r = pp(f, tokenizer, ro / "new" / "ds", check=False)
        assert_one_line_error(r, f"cannot create directory {ro / 'new'} (")
        assert os.listdir(ro) == []
    finally:
        undo()

    # a disk with no room for even one byte: the probe writes one before the tokenizer is loaded
    r = _pp_limited([f], tokenizer, tmp_path / "full" / "ds", fsize=0)
    assert_one_line_error(r, f"cannot write in {tmp_path / 'full'} (File too large)")
    assert os.listdir(tmp_path / "full") == []


def test_disk_full_mid_shard_or_mid_merge_keeps_everything(tmp_path, corpus, tokenizer):
    """A write that fails while tokenizing or merging ends the run with one line naming the file;
    the previous output and every finished shard survive, no temporary is left, and the rerun
    completes to the same bytes as an uninterrupted run."""
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", corpus[i::4]) for i in range(4)]
    pp(files, tokenizer, tmp_path / "ref", "--workers", "1")
    out = tmp_path / "o" / "ds"
    pp(files[:2], tokenizer, out, "--workers", "1")  # an earlier, different output under the same prefix
    before = {ext: open(str(out) + ext, "rb").read() for ext in (".bin", ".idx", ".manifest.json")}

    def assert_previous_output_intact():
        for ext, data in before.items():
            assert open(str(out) + ext, "rb").read() == data, ext
        assert not [f for f in os.listdir(out.parent) if ".tmp" in f or f.endswith(".lock")]

    shard_dir = str(out) + ".shards"
    # full while a shard is written (64 KB: each shard holds ~160 KB of tokens)
    r = _pp_limited(files, tokenizer, out, "--workers", "2", "--chunk-mb", "0.02", fsize=64 << 10)
    assert_one_line_error(r, f"{shard_dir}/shard-00000.bin: File too large while writing shard 0",
                          "finished shards are kept; rerun to continue")
    assert_previous_output_intact()
    assert not [f for f in os.listdir(shard_dir) if ".tmp" in f or f.startswith(".spill")]

    # full during the merge: every shard fits under the limit, their concatenation does not
    limit = 400 << 10
    total = os.path.getsize(tmp_path / "ref.bin")
    r = _pp_limited(files, tokenizer, out, "--workers", "1", fsize=limit)
    assert_one_line_error(r, f"{out}.bin: File too large while merging into {out}.bin/.idx",
                          "nothing was replaced; rerun to retry")
    shard_bins = [os.path.getsize(os.path.join(shard_dir, f"shard-{i:05d}.bin")) for i in range(4)]
    assert max(shard_bins) < limit < total == sum(shard_bins)  # the limit really sat between the two
    assert_previous_output_intact()
    assert sorted(f for f in os.listdir(shard_dir) if f.endswith(".json")) == [
        f"shard-{i:05d}.json" for i in range(4)]

    r = pp(files, tokenizer, out, "--workers", "1", "--progress", "log")
    assert "4 of 4 shards already complete" in r.stderr
    assert same_files(tmp_path / "ref", out)
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f or f.endswith(".lock")]


def test_a_corrupt_index_is_one_line_naming_it(tmp_path):
    """A FormatError from the one .idx reader (megafox/formats) reaches the user as data_prep's
    other bad input does: one line naming the file, exit status 2."""
    for name in ("chat", "chat.mask"):
        (tmp_path / f"{name}.idx").write_bytes(b"not an index at all")
        (tmp_path / f"{name}.bin").write_bytes(b"")
    r = run_module("data_prep.sft", "--show", str(tmp_path / "chat"), "--tokenizer", str(tmp_path / "none.model"),
                   check=False)
    assert_one_line_error(r, f"{tmp_path / 'chat.idx'} is not a readable Megatron index")
