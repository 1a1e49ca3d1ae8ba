"""Shared helpers: tokenizers trained on real text, small HF Llamas, and a CLI runner."""
import dataclasses
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LICENSES = Path("/usr/share/common-licenses")


def real_texts():
    """CPython stdlib source and prose (license texts, stdlib docstrings) the tokenizer never saw."""
    code = [STDLIB / "collections/__init__.py", STDLIB / "difflib.py", STDLIB / "typing.py", STDLIB / "json/encoder.py"]
    texts = [p.read_text() for p in code]
    prose = [LICENSES / "Apache-2.0", LICENSES / "GPL-3", LICENSES / "MPL-2.0"]
    texts += [p.read_text() for p in prose if p.is_file()]
    import difflib
    import textwrap
    texts += [difflib.__doc__, textwrap.__doc__]
    texts += ["  two leading spaces", "trailing\t \n\n", "x", "héllo wörld 1234567 日本語 😀 ß ﬁ", "\n\n\n    indented"]
    return texts


def train_sp(out_dir: Path, vocab_size: int, layout: str) -> Path:
    """layout 'fox': data_prep's settings (unk 0, bos 1, eos 2, pad 3, identity normalization,
    whitespace kept); 'gemma': Gemma's id order (pad 0, eos 1, bos 2, unk 3), no dummy prefix,
    user-defined turn markers."""
    import sentencepiece as spm

    files = [STDLIB / "argparse.py", STDLIB / "textwrap.py", STDLIB / "json/decoder.py", STDLIB / "string.py"]
    lines = [l for f in files for l in f.read_text().split("\n") if l.strip()]
    if (LICENSES / "GPL-2").is_file():
        lines += [l for l in (LICENSES / "GPL-2").read_text().split("\n") if l.strip()]
    common = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                  normalization_rule_name="identity", remove_extra_whitespaces=False,
                  allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1)
    if layout == "fox":
        extra = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    else:
        extra = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
                     user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out_dir / "sp"), **common, **extra)
    return out_dir / "sp.model"


def tiny(tie: bool = True, **kw):
    from megafox.config import fox1_tiny

    return dataclasses.replace(fox1_tiny(), tie_word_embeddings=tie, **kw)


def save_hf_dir(model, out_dir: Path, seed: int = 0, dtype=None) -> Path:
    import torch

    from megafox.testing.hf_reference import hf_llama

    hf = hf_llama(model, seed)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def run_tool(module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", f"checkpoints_tools.{module}", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
