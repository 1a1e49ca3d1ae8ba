"""The trained tokenizer follows Fox-1's conventions."""

import json
import os

from tests.support.processes import run_module
from tests.support.text import stdlib_files


def test_conventions(sp, tokenizer):
    assert sp.GetPieceSize() == 2000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.pad_id() >= 0 and sp.id_to_piece(sp.pad_id()) == "<pad>"
    # byte fallback: unseen characters become byte pieces, never <unk>
    ids = sp.encode("🦊 東京")
    assert sp.unk_id() not in ids and sp.decode(ids) == "🦊 東京"
    # digits split
    assert [p for p in sp.encode("x = 123456", out_type=str) if any(c.isdigit() for c in p)] == list("123456")
    meta = json.load(open(os.path.join(os.path.dirname(tokenizer), "tokenizer.json")))
    assert meta["config"]["vocab_size"] == 2000 and meta["config"]["model_type"] == "bpe"


def test_cli_and_reuse(tmp_path):
    args = ["--input", *stdlib_files(["json/*.py"]), "--format", "text", "--vocab-size", "500",
            "--output", tmp_path / "t", "--sample-mb", "0.03"]
    r = run_module("data_prep.train_tokenizer", *args, check=True)
    assert "trained BPE vocab 500" in r.stdout and (tmp_path / "t" / "tokenizer.model").exists()
    meta = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    assert meta["sample"]["bytes_sampled"] <= 30_000 < meta["sample"]["bytes_seen"]  # bounded sample
    r = run_module("data_prep.train_tokenizer", *args, check=True)
    assert "up to date" in r.stdout


def test_missing_input_clear_error(tmp_path):
    r = run_module("data_prep.train_tokenizer", "--input", tmp_path / "nope*.jsonl", "--output", tmp_path / "t",
                   "--vocab-size", "500")
    assert r.returncode == 2 and "matches no file" in r.stderr and "Traceback" not in r.stderr
