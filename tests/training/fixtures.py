"""Tiny real training data for the trainer tests: a SentencePiece model trained on CPython's
standard library sources, Megatron indexed datasets written with megatron-core's
IndexedDatasetBuilder (each document ends with the tokenizer's eos), and one blend.json per
stage in the data_prep contract's format."""
from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import numpy as np

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = {"email": "email/*.py", "json": "json/*.py", "http": "http/*.py", "logging": "logging/*.py"}
BLENDS = {
    "stage1": {"email": 0.7, "json": 0.3},
    "stage2": {"email": 0.5, "http": 0.5},
    "stage3": {"logging": 1.0},
}
VOCAB = 2000  # as configs/data/tiny.yaml; configs/train/tiny.yaml sizes the model for it


def _documents(name: str):
    """Blank-line separated blocks of the sources, one document each: many short documents, as
    real corpora have, so a stage reads only part of a shared dataset and leaves the rest for
    the next stage (one file per document would have every file touched by the first stage)."""
    docs = []
    for path in sorted(STDLIB.glob(SOURCES[name])):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]
    return docs


def build_tiny_data(root: Path) -> Path:
    """Write <root>/tokenizer.model, <root>/shards/<name>.bin/.idx, <root>/<stage>/blend.json."""
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    with open(corpus, "w") as f:
        for name in SOURCES:
            for doc in _documents(name):
                f.write("\n".join(line for line in doc.splitlines() if line.strip()) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=2,
        max_sentence_length=100000, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    counts = {}
    for name in SOURCES:
        prefix = root / "shards" / name
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
        docs = _documents(name)
        total = 0
        for ids in sp.encode(docs, num_threads=1):
            ids = ids + [sp.eos_id()]
            builder.add_document(torch.tensor(ids), [len(ids)])
            total += len(ids)
        builder.finalize(str(prefix) + ".idx")
        counts[name] = (len(docs), total)
    for stage, weights in BLENDS.items():
        (root / stage).mkdir(exist_ok=True)
        blend = {"stage": stage, "tokenizer": "../tokenizer.model",
                 "datasets": [{"prefix": f"../shards/{n}", "weight": w, "documents": counts[n][0],
                               "tokens": counts[n][1]} for n, w in weights.items()],
                 "token_budget": 100000}
        (root / stage / "blend.json").write_text(json.dumps(blend, indent=2))
    return root


if __name__ == "__main__":
    import sys

    print(build_tiny_data(Path(sys.argv[1])))
