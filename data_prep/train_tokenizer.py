"""Train a SentencePiece BPE tokenizer with Fox-1's conventions.

    python -m data_prep.train_tokenizer --input GLOB [GLOB ...] --vocab-size N --output DIR
        [--json-key text] [--format auto|jsonl|parquet|text] [--sample-mb 2000] [--seed 0]
        [--character-coverage 0.9995] [--threads N] [--force]

Writes DIR/tokenizer.model (+ tokenizer.vocab, tokenizer.json with the settings and sample stats).
Conventions: BPE, unk=0, bos=1, eos=2, pad=3, byte fallback, digits split into single digits,
no text normalization (code keeps its whitespace).  Fox-1 uses --vocab-size 256000.
The input is sampled uniformly at the line level down to --sample-mb of text, so memory stays
bounded whatever the corpus size.  An existing tokenizer with the same settings is kept.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import shutil
import sys
import tempfile
import time

import sentencepiece as spm

from .common import FORMATS, DataPrepError, detect_format, expand_inputs, log, run_main, setup_logging
from megafox.runtime.fs import atomic_write_json
from .readers import iter_documents

FOX1_VOCAB = 256000
MAX_SENTENCE_CHARS = 4096
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def sample_sentences(files, fmt: str, json_key: str, budget_bytes: int, seed: int = 0):
    """Uniform line sample bounded by `budget_bytes` (priority sampling: keep the smallest keys)."""
    rng = random.Random(seed)
    heap = []  # (-key, seq, line) : a max-heap on key
    size = 0
    seen_lines = seen_bytes = 0
    seq = 0
    for path in files:
        for doc in iter_documents(path, detect_format(path, fmt), json_key):
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                if len(line) > MAX_SENTENCE_CHARS:
                    line = line[:MAX_SENTENCE_CHARS]
                n = len(line.encode("utf-8", "replace"))
                seen_lines += 1
                seen_bytes += n
                key = rng.random()
                if size + n <= budget_bytes:
                    heapq.heappush(heap, (-key, seq, line))
                    size += n
                elif heap and key < -heap[0][0]:
                    heapq.heappush(heap, (-key, seq, line))
                    size += n
                    while size > budget_bytes and heap:
                        _, _, old = heapq.heappop(heap)
                        size -= len(old.encode("utf-8", "replace"))
                seq += 1
    lines = [x[2] for x in sorted(heap, key=lambda x: x[1])]  # keep corpus order: deterministic
    return lines, {"lines_seen": seen_lines, "bytes_seen": seen_bytes, "lines_sampled": len(lines),
                   "bytes_sampled": size}


def train(inputs, vocab_size: int, output: str, json_key: str = "text", fmt: str = "auto",
          sample_mb: float = 2000.0, seed: int = 0, character_coverage: float = 0.9995,
          threads: int = 0, force: bool = False, quiet: bool = False) -> str:
    """Train (or reuse) DIR/tokenizer.model; returns its path."""
    if vocab_size < 300:
        raise DataPrepError(f"--vocab-size {vocab_size}: too small (byte fallback alone needs 259 pieces)")
    files = expand_inputs(inputs)
    for f in files:
        detect_format(f, fmt)
    config = {"vocab_size": vocab_size, "model_type": "bpe", **SPECIAL_IDS, "byte_fallback": True,
              "split_digits": True, "character_coverage": character_coverage, "json_key": json_key,
              "format": fmt, "sample_mb": sample_mb, "seed": seed, "inputs": files}
    os.makedirs(output, exist_ok=True)
    model_path = os.path.join(output, "tokenizer.model")
    meta_path = os.path.join(output, "tokenizer.json")
    if not force and os.path.isfile(model_path):
        try:
            with open(meta_path) as f:
                same = json.load(f).get("config") == config
        except (OSError, ValueError):
            same = False
        if same:
            if not quiet:
                print(f"{model_path}: up to date", flush=True)
            return model_path
    t0 = time.monotonic()
    lines, stats = sample_sentences(files, fmt, json_key, int(sample_mb * 1e6), seed)
    if not lines:
        raise DataPrepError("no text found in the tokenizer inputs")
    if not quiet:
        log.info("tokenizer sample: %d of %d lines, %.1f MB of %.1f MB", stats["lines_sampled"],
                 stats["lines_seen"], stats["bytes_sampled"] / 1e6, stats["bytes_seen"] / 1e6)
    tmpdir = tempfile.mkdtemp(prefix=".tokenizer.", dir=output)
    try:
        prefix = os.path.join(tmpdir, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                **SPECIAL_IDS, byte_fallback=True, split_digits=True, character_coverage=character_coverage,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=threads or os.cpu_count() or 1,
                train_extremely_large_corpus=len(lines) > 50_000_000, minloglevel=2,
            )
        except RuntimeError as e:
            raise DataPrepError(f"SentencePiece training failed: {str(e).strip()[:300]}") from None
        os.replace(prefix + ".vocab", os.path.join(output, "tokenizer.vocab"))
        os.replace(prefix + ".model", model_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    atomic_write_json(meta_path, {"config": config, "sample": stats, "elapsed_s": round(elapsed, 2)})
    if not quiet:
        print(f"{model_path}: trained BPE vocab {vocab_size} on {stats['bytes_sampled'] / 1e6:.1f} MB "
              f"({stats['lines_sampled']} lines) in {elapsed:.1f}s", flush=True)
    return model_path


def _main(argv=None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m data_prep.train_tokenizer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="GLOB")
    p.add_argument("--vocab-size", type=int, default=FOX1_VOCAB)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--json-key", default="text")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--sample-mb", type=float, default=2000.0, help="text kept in memory for training (MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if DIR/tokenizer.model is up to date")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    train(a.input, a.vocab_size, a.output, a.json_key, a.format, a.sample_mb, a.seed, a.character_coverage,
          a.threads, a.force, a.quiet)
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
