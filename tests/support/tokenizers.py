"""SentencePiece models trained on real text in a fraction of a second (or a few seconds for
vocab 2000), with Fox-1's special ids unless a test asks for another layout, and the documents
they encode, as data_prep writes them (eos after each)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Union


def train_sentencepiece(out_dir: Union[str, Path], texts: Iterable[str], vocab_size: int, *,
                        name: str = "tokenizer", model_type: str = "bpe", byte_fallback: bool = True,
                        unk_id: int = 0, bos_id: int = 1, eos_id: int = 2, pad_id: int = 3,
                        **settings) -> Path:
    """Train on the non-blank lines of `texts` (whole files or lines) and write
    <out_dir>/<name>.model. Special ids default to Fox-1's (unk 0, bos 1, eos 2, pad 3); -1 leaves
    one undefined. `settings` go to SentencePieceTrainer as they are (user_defined_symbols,
    split_digits, normalization_rule_name, character_coverage, ...)."""
    import sentencepiece as spm

    # One sentence per line, as SentencePiece reads an input file (its model is the same); blank
    # lines carry nothing to learn.
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"minloglevel": 2, **settings}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_dir / name), vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, unk_id=unk_id, bos_id=bos_id, eos_id=eos_id,
        pad_id=pad_id, **settings)
    return out_dir / f"{name}.model"


def encode_documents(tokenizer, texts: Iterable[str], *, max_tokens: Optional[int] = None,
                     eos: bool = True) -> List[List[int]]:
    """Each text's ids (cut to `max_tokens`), then the tokenizer's eos: one document each.
    `tokenizer`: a SentencePieceProcessor or the path of its model."""
    import sentencepiece as spm

    if not isinstance(tokenizer, spm.SentencePieceProcessor):
        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer))
    end = [tokenizer.eos_id()] if eos else []
    return [ids[:max_tokens] + end for ids in tokenizer.encode(list(texts), num_threads=1)]
