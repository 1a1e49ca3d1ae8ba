"""Tiny real training data for the trainer tests: a SentencePiece model trained on CPython's
standard library sources, Megatron indexed datasets of them (each document ends with the
tokenizer's eos), and one blend.json per stage in the data_prep contract's format."""
from __future__ import annotations

from pathlib import Path

from tests.support.indexed import write_blend, write_indexed
from tests.support.text import paragraphs, stdlib_texts
from tests.support.tokenizers import encode_documents, train_sentencepiece

SOURCES = {"email": "email/*.py", "json": "json/*.py", "http": "http/*.py", "logging": "logging/*.py"}
BLENDS = {
    "stage1": {"email": 0.7, "json": 0.3},
    "stage2": {"email": 0.5, "http": 0.5},
    "stage3": {"logging": 1.0},
}
VOCAB = 2000  # as configs/data/tiny.yaml; configs/train/tiny.yaml sizes the model for it


def build_tiny_data(root: Path) -> Path:
    """Write <root>/tokenizer.model, <root>/shards/<name>.bin/.idx, <root>/<stage>/blend.json."""
    root = Path(root)
    # Blank-line separated blocks, one document each: many short documents, as real corpora have,
    # so a stage reads only part of a shared dataset and leaves the rest for the next stage (one
    # file per document would have every file touched by the first stage).
    documents = {name: paragraphs(stdlib_texts([pattern]), loose=True) for name, pattern in SOURCES.items()}
    tokenizer = train_sentencepiece(root, [doc for docs in documents.values() for doc in docs], VOCAB,
                                    byte_fallback=False, pad_id=-1, character_coverage=1.0, max_sentence_length=100000)
    for name, docs in documents.items():
        write_indexed(root / "shards" / name, encode_documents(tokenizer, docs))
    for stage, weights in BLENDS.items():
        datasets = [(root / "shards" / name, weight) for name, weight in weights.items()]
        write_blend(root / stage / "blend.json", tokenizer, datasets, 100000, stage, counts=True)
    return root


if __name__ == "__main__":
    import sys

    print(build_tiny_data(Path(sys.argv[1])))
