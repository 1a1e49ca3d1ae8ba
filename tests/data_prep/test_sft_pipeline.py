"""The SFT data contract end to end: a `kind: sft` plan -> tokens + uint8 masks with identical document
boundaries that megatron-core reads, a blend.json the trainer's reader accepts, conversations equal to
apply_chat_template's; byte-identical for any worker count / shard split / array split; resumable."""
import json
import os

import numpy as np

from data_prep import sft_offline_chat as chat
from data_prep.sft_readers import parse_records, to_conversation
from tests.data_prep.dp_helpers import lock_held_elsewhere
from tests.data_prep.dp_sft_helpers import export_hf, reference_mask, sft
from tests.support.processes import REPO, run_module

TINY_SFT = os.path.join(REPO, "configs", "data", "tiny_sft.yaml")
EXTS = (".bin", ".idx", ".mask.bin", ".mask.idx")


def tiny_plan(tmp_path, tokenizer, raw):
    """configs/data/tiny_sft.yaml with its paths moved under tmp_path (and the session's tokenizer)."""
    import yaml

    plan = yaml.safe_load(open(TINY_SFT))
    plan["tokenizer"] = {"model": str(tokenizer)}
    for src in plan["stages"]["sft"]["sources"]:
        src["globs"] = [g.replace("data/tiny_sft/raw", str(raw)) for g in src["globs"]]
    path = tmp_path / "tiny_sft.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def records_in_order(path):
    """(line, object) of every parsed record of a chat file, read the way data_prep reads it."""
    from data_prep.sft_readers import ChatFileReader

    fmt = "parquet" if path.endswith(".parquet") else "jsonl"
    out = []
    for ch in ChatFileReader(path, fmt, 1 << 20).chunks():
        out += parse_records(ch)[0]
    return out


def read_pair(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, mask = IndexedDataset(str(prefix)), IndexedDataset(str(prefix) + ".mask")
    return ids, mask


def test_tiny_sft_plan_contract(tmp_path, tokenizer):
    from megafox.data.blend import read_blend

    raw = tmp_path / "raw"
    chat.write_all(str(raw))
    plan = tiny_plan(tmp_path, tokenizer, raw)
    run_module("data_prep.plan", "--plan", plan, "--output-dir", tmp_path / "data", "--quiet", check=True)
    blend_path = tmp_path / "data" / "sft" / "blend.json"
    raw_blend = json.loads(blend_path.read_text())
    from data_prep.chat_template import BUILTIN_TEMPLATES

    assert raw_blend["kind"] == "sft" and raw_blend["seq_length"] == 512
    assert raw_blend["chat_template"] == BUILTIN_TEMPLATES["fox1"] and raw_blend["chat_template_name"] == "fox1"
    blend = read_blend(blend_path)  # the trainer's reader accepts the sft blend as it is
    # the plan names no weights: each source's share is its conversation count (each one once per epoch)
    assert [d.weight for d in blend.datasets] == [d["documents"] for d in raw_blend["datasets"]]
    assert [d.weight for d in blend.datasets] == [len(read_pair(d.prefix)[0]) for d in blend.datasets]
    assert blend.token_budget == 200000

    hf = export_hf(tokenizer, tmp_path / "hf", raw_blend["chat_template"])
    truncated = 0
    for entry, d in zip(blend.datasets, raw_blend["datasets"]):
        ids_ds, mask_ds = read_pair(entry.prefix)
        assert d["mask_prefix"] == d["prefix"] + ".mask"
        assert ids_ds.index.dtype == np.uint16 and mask_ds.index.dtype == np.uint8
        assert np.array_equal(ids_ds.sequence_lengths, mask_ds.sequence_lengths)
        assert np.array_equal(ids_ds.document_indices, mask_ds.document_indices)
        assert np.array_equal(ids_ds.document_indices, np.arange(len(ids_ds) + 1))  # one document per conversation
        assert entry.lengths.tolist() == ids_ds.sequence_lengths.tolist() and len(ids_ds) == d["documents"]
        masks = [np.asarray(mask_ds[i]) for i in range(len(mask_ds))]
        assert sum(int(m.sum()) for m in masks) == d["trained_tokens"] and set(np.concatenate(masks)) == {0, 1}
        assert ids_ds.sequence_lengths.max() <= 512 and sum(ids_ds.sequence_lengths) == d["tokens"]

        # conversation i of the output is the i-th kept record of the inputs, as transformers renders it
        man = json.loads(open(entry.prefix + ".manifest.json").read())
        rejects = [json.loads(x) for x in open(entry.prefix + ".rejects.jsonl")]
        dropped = {(x["file"], x["line"]) for x in rejects if x["action"] == "dropped"}
        kept = {(x["file"], x["line"]): int(x["detail"].split()[1]) for x in rejects if x["action"] == "truncated"}
        i = 0
        for inp in man["inputs"]:
            for line, obj in records_in_order(inp["path"]):
                if (inp["path"], line) in dropped:
                    continue
                msgs, _, reason = to_conversation(obj)
                assert reason is None
                cut = kept.get((inp["path"], line), len(msgs))
                msgs = msgs[:cut]
                assert msgs[-1]["role"] == "assistant"
                ids, mask = np.asarray(ids_ds[i]).tolist(), np.asarray(mask_ds[i]).tolist()
                assert ids == hf.apply_chat_template(msgs, tokenize=True)["input_ids"]
                if i % 4 == 0 or (inp["path"], line) in kept:
                    assert mask == reference_mask(hf, msgs)[0]
                assert ids[-1] == hf.eos_token_id and mask[-1] == 1  # every conversation ends with a trained eos
                i += 1
        assert i == len(ids_ds)  # every conversation checked
        truncated += len(kept)
    assert truncated >= 2


def _run(files, tokenizer, out, *extra, check=True):
    return sft("--input", *files, "--tokenizer", tokenizer, "--output-prefix", out, "--chat-template", "fox1",
               "--seq-length", 384, "--progress", "none", *extra, check=check)


def same(a, b, exts=EXTS):
    return all(open(str(a) + e, "rb").read() == open(str(b) + e, "rb").read() for e in exts)


def test_byte_identical_any_workers_shards_and_array_split(tmp_path, tokenizer):
    files = chat.write_all(str(tmp_path / "raw"))
    _run(files, tokenizer, tmp_path / "ref", "--workers", 1)
    _run(files, tokenizer, tmp_path / "w2", "--workers", 2, "--chunk-mb", 0.01)
    assert same(tmp_path / "ref", tmp_path / "w2", EXTS + (".rejects.jsonl",))
    # 7 shards from 4 files: chat.jsonl is cut into byte ranges
    _run(files, tokenizer, tmp_path / "k7", "--workers", 2, "--shards", 7)
    assert same(tmp_path / "ref", tmp_path / "k7")
    arr = tmp_path / "arr" / "chat"
    for i in (1, 0, 2):  # SLURM array tasks, any order, then the merge job
        r = _run(files, tokenizer, arr, "--workers", 1, "--shards", 5, "--array-index", i, "--array-count", 3)
        assert f"array task {i}/3" in r.stdout and not os.path.exists(str(arr) + ".bin")
    _run(files, tokenizer, arr, "--shards", 5, "--merge")
    assert same(tmp_path / "ref", arr) and not os.path.exists(str(arr) + ".shards")
    a = json.loads(open(str(tmp_path / "ref") + ".manifest.json").read())
    b = json.loads(open(str(arr) + ".manifest.json").read())
    for key in ("conversations", "dropped", "truncated", "tokens", "trained_tokens", "record_forms"):
        assert a[key] == b[key], key


def test_resume_skips_finished_shards_and_redoes_changed_settings(tmp_path, tokenizer):
    files = chat.write_all(str(tmp_path / "raw"))
    _run(files, tokenizer, tmp_path / "ref", "--workers", 1)
    out = tmp_path / "o"
    _run(files, tokenizer, out, "--workers", 1, "--array-index", 0, "--array-count", 2)  # half the shards
    done = str(out) + ".shards/shard-00000.json"
    m0 = os.stat(done).st_mtime_ns
    partial = str(out) + ".shards/.shard-00003.mask.bin.tmp99999"  # left by a killed run
    open(partial, "wb").write(b"\x01" * 10)
    r = _run(files, tokenizer, out, "--workers", 2, "--keep-shards", "--progress", "log")
    assert "2 of 4 shards already complete" in r.stderr
    assert os.stat(done).st_mtime_ns == m0 and not os.path.exists(partial)
    assert same(tmp_path / "ref", out)
    before = {e: os.stat(str(out) + e).st_mtime_ns for e in EXTS}
    r = _run(files, tokenizer, out, "--workers", 2)
    assert "up to date" in r.stdout and before == {e: os.stat(str(out) + e).st_mtime_ns for e in EXTS}
    # another seq_length is another output: redone, equal to a fresh run with it
    _run(files, tokenizer, out, "--workers", 2, "--seq-length", 256)
    sft("--input", *files, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "ref256", "--chat-template",
        "fox1", "--seq-length", 256, "--progress", "none", "--workers", 1)
    assert same(tmp_path / "ref256", out) and not same(tmp_path / "ref", out)


def test_merge_holds_the_output_lock_and_clears_a_killed_merges_temporaries(tmp_path, tokenizer):
    """The engine's merge, as for pretraining: refused while another writer holds .PREFIX.lock;
    once it is gone, the temporaries its killed merge left (mask, rejects) are removed."""
    files = [f for f in chat.write_all(str(tmp_path / "raw")) if f.endswith((".zst", ".gz"))]  # the small ones
    _run(files, tokenizer, tmp_path / "ref", "--workers", 1)
    out = tmp_path / "o" / "chat"
    _run(files, tokenizer, out, "--workers", 1, "--array-index", 0, "--array-count", 1)
    with lock_held_elsewhere(out) as holder:
        r = _run(files, tokenizer, out, "--merge", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"error: {out}: another process (pid {holder.pid} on " in r.stderr and "is writing it now" in r.stderr
        assert not os.path.exists(str(out) + ".bin") and not os.path.exists(str(out) + ".mask.bin")
    stale = [out.parent / f".chat.mask.bin.tmp{holder.pid}", out.parent / f".chat.rejects.jsonl.tmp{holder.pid}"]
    for f in stale:
        f.write_bytes(b"partial")
    r = _run(files, tokenizer, out, "--merge")
    assert "removed 2 temporary file(s) of an interrupted run" in r.stderr
    assert same(tmp_path / "ref", out, EXTS + (".rejects.jsonl",))
    assert not [f for f in os.listdir(out.parent) if f.startswith(".")] and not os.path.exists(str(out) + ".shards")


def test_show_marks_the_trained_tokens(tmp_path, tokenizer):
    files = chat.write_all(str(tmp_path / "raw"), bad=False)
    _run(files, tokenizer, tmp_path / "s", "--workers", 1)
    r = sft("--show", tmp_path / "s", "--index", 1)
    first = chat.chat_records()[1]["messages"]
    assert first[0]["role"] == "user"
    assert (f"<|user|>\n{first[0]['content']}</s> <|assistant|>\n[[{first[1]['content']}</s>]]" in r.stdout), r.stdout
    assert sft("--show", tmp_path / "s", "--index", 10 ** 6, check=False).returncode == 2


def test_offline_chat_data_is_reproducible(tmp_path):
    """The same Python writes the same chat files (the tiny plan's and the demo's inputs), in another
    process too (no object addresses or hash order in the text)."""
    a = chat.write_all(str(tmp_path / "a"))
    run_module("data_prep.sft_offline_chat", "--output", tmp_path / "b", check=True)
    assert [open(x, "rb").read() for x in a] == [open(str(x).replace("/a/", "/b/"), "rb").read() for x in a]
    assert len(chat.chat_records()) > 200 and any(len(r["messages"]) >= 6 for r in chat.chat_records())


def test_plan_array_tasks_then_finalize_equal_one_run(tmp_path, tokenizer):
    """What launch/preprocess.slurm runs for an sft plan (array tasks, then --finalize) == `make preprocess`."""
    raw = tmp_path / "raw"
    chat.write_all(str(raw))
    plan = tiny_plan(tmp_path, tokenizer, raw)
    run_module("data_prep.plan", "--plan", plan, "--output-dir", tmp_path / "one", "--quiet", "--workers", 1,
               check=True)
    for i in (1, 0):
        run_module("data_prep.plan", "--plan", plan, "--output-dir", tmp_path / "arr", "--quiet", "--workers", 1,
                   "--array-index", i, "--array-count", 2, check=True)
    assert not (tmp_path / "arr" / "sft" / "blend.json").exists()
    run_module("data_prep.plan", "--plan", plan, "--output-dir", tmp_path / "arr", "--quiet", "--finalize", check=True)
    for src in ("chat", "alpaca"):
        assert same(tmp_path / "one" / "sft" / src, tmp_path / "arr" / "sft" / src, EXTS + (".rejects.jsonl",))
    a = json.loads((tmp_path / "one" / "sft" / "blend.json").read_text())
    b = json.loads((tmp_path / "arr" / "sft" / "blend.json").read_text())
    assert a == b and a["kind"] == "sft"
