"""Round trip on real text: what megatron-core's IndexedDataset reads back == SentencePiece encode (+ eos)."""

import json

import numpy as np
import pytest
import zstandard

from tests.data_prep.dp_helpers import pp, same_files, write_jsonl, write_jsonl_gz
from tests.support.indexed import read_indexed, write_indexed
from tests.support.text import stdlib_texts
from tests.support.tokenizers import encode_documents, train_sentencepiece


def _inputs(tmp_path, corpus):
    """The corpus split over the four container formats (order = document order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(corpus)
    a, b, c = n // 4, n // 2, 3 * n // 4
    f1 = write_jsonl(tmp_path / "a.jsonl", corpus[:a])
    f2 = write_jsonl_gz(tmp_path / "b.jsonl.gz", corpus[a:b])
    f3 = tmp_path / "c.jsonl.zst"
    raw = "".join(json.dumps({"text": d}) + "\n" for d in corpus[b:c]).encode()
    f3.write_bytes(zstandard.ZstdCompressor().compress(raw))
    f4 = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": corpus[c:], "n": list(range(n - c))}), f4, row_group_size=7)
    return [f1, f2, str(f3), str(f4)]


def test_roundtrip_all_formats_uint16(tmp_path, corpus, tokenizer, sp):
    files = _inputs(tmp_path, corpus)
    r = pp(files, tokenizer, tmp_path / "out" / "ds", "--workers", "2")
    assert "documents" in r.stdout
    docs, ds = read_indexed(tmp_path / "out" / "ds")
    assert ds.index.dtype == np.uint16
    assert docs == encode_documents(sp, corpus)
    man = json.loads((tmp_path / "out" / "ds.manifest.json").read_text())
    assert man["documents"] == len(corpus)
    assert man["tokens"] == sum(len(d) for d in docs)
    assert man["dtype"] == "uint16" and man["skipped_total"] == 0
    assert [i["path"].split("/")[-1] for i in man["inputs"]] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    assert all(len(i["sha256"]) == 64 and i["size"] > 0 for i in man["inputs"])
    assert len(man["tokenizer"]["sha256"]) == 64 and man["tokenizer"]["eos_id"] == sp.eos_id()
    assert man["elapsed_s"] > 0 and man["tokens_per_s"] > 0


def test_int32_and_no_eod(tmp_path, corpus, tokenizer, sp):
    f = write_jsonl(tmp_path / "a.jsonl", corpus[:20])
    pp(f, tokenizer, tmp_path / "i32", "--dtype", "int32", "--no-append-eod", "--workers", "1")
    docs, ds = read_indexed(tmp_path / "i32")
    assert ds.index.dtype == np.int32
    assert docs == encode_documents(sp, corpus[:20], eos=False)


def test_text_files_one_document_each(tmp_path, corpus, tokenizer, sp):
    paths = []
    for i, d in enumerate(corpus[:5]):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(d, encoding="utf-8")
        paths.append(str(p))
    pp([str(tmp_path / "doc*.txt")], tokenizer, tmp_path / "txt", "--workers", "2")
    docs, _ = read_indexed(tmp_path / "txt")
    assert docs == encode_documents(sp, corpus[:5])


def test_idx_identical_to_megatron_builder(tmp_path, corpus, tokenizer, sp):
    """Our numpy .idx/.bin writer produces exactly the bytes of megatron-core's IndexedDatasetBuilder
    (which write_indexed runs)."""
    docs = corpus[:30]
    pp(write_jsonl(tmp_path / "a.jsonl", docs), tokenizer, tmp_path / "ours", "--workers", "1")
    write_indexed(tmp_path / "ref", encode_documents(sp, docs), dtype=np.uint16)
    assert same_files(tmp_path / "ours", tmp_path / "ref")


@pytest.mark.parametrize("extra", [["--shards", "3"], ["--chunk-mb", "0.01"]])
def test_workers_deterministic(tmp_path, corpus, tokenizer, extra):
    files = _inputs(tmp_path, corpus)
    pp(files, tokenizer, tmp_path / "w1", "--workers", "1")
    pp(files, tokenizer, tmp_path / "w2", "--workers", "2", *extra)
    assert same_files(tmp_path / "w1", tmp_path / "w2")


def test_eos_taken_from_tokenizer(tmp_path, corpus):
    """Any SentencePiece model is accepted; eos comes from the model (here id 5), never hard-coded."""
    import sentencepiece as spm

    model = train_sentencepiece(tmp_path, stdlib_texts(["json/*.py"]), 400, name="odd", model_type="unigram",
                                byte_fallback=False, unk_id=3, bos_id=-1, eos_id=5, pad_id=-1)
    sp2 = spm.SentencePieceProcessor(model_file=str(model))
    assert sp2.eos_id() == 5
    pp(write_jsonl(tmp_path / "a.jsonl", corpus[:5]), model, tmp_path / "o", "--workers", "1")
    docs, _ = read_indexed(tmp_path / "o")
    assert docs == encode_documents(sp2, corpus[:5]) and all(d[-1] == 5 for d in docs)


def test_dtype_rule():
    from megafox.formats.indexed import optimal_dtype

    assert optimal_dtype(2000) is np.uint16 and optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32 and optimal_dtype(256000) is np.int32
