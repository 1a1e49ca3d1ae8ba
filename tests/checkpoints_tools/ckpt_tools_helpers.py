"""Shared by the checkpoint-tool tests: tokenizers with Fox-1's and Gemma's special-id layouts,
small HF Llamas saved as HF directories, and the tools run as a user runs them."""
import dataclasses
from pathlib import Path

from tests.support.processes import run_module
from tests.support.text import license_texts, stdlib_texts
from tests.support.tokenizers import train_sentencepiece

SPECIAL_LAYOUTS = {
    # data_prep's settings
    "fox": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3),
    # Gemma's id order, no dummy prefix, user-defined turn markers
    "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
                  user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]),
}


def train_sp(out_dir: Path, vocab_size: int, layout: str) -> Path:
    """A BPE model with `layout`'s special ids (SPECIAL_LAYOUTS), identity normalization and
    whitespace kept, trained on stdlib sources and the GPL-2 text."""
    texts = stdlib_texts(["argparse.py", "textwrap.py", "json/decoder.py", "string.py"]) + license_texts(["GPL-2"])
    return train_sentencepiece(out_dir, texts, vocab_size, split_digits=True, normalization_rule_name="identity",
                               remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                               **SPECIAL_LAYOUTS[layout])


def tiny(tie: bool = True, **kw):
    from megafox.config import fox1_tiny

    return dataclasses.replace(fox1_tiny(), tie_word_embeddings=tie, **kw)


def save_hf_dir(model, out_dir: Path, seed: int = 0, dtype=None) -> Path:
    from tests.support.hf_reference import hf_llama

    hf = hf_llama(model, seed)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def run_tool(module: str, *args, timeout: float = 300):
    """`python -m checkpoints_tools.MODULE ARGS`."""
    return run_module(f"checkpoints_tools.{module}", *args, timeout=timeout)
