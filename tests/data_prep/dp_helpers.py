"""data_prep's preprocessing CLI as a user runs it, its inputs (JSONL, gzipped JSONL) and the
byte-for-byte comparison of two outputs."""
import gzip
import json
import os

from tests.support.processes import run_module

# the stdlib packages the session corpus is read from
SLICE = ["email/*.py", "json/*.py", "http/*.py", "html/*.py", "urllib/*.py"]


def pp(inputs, tokenizer, prefix, *extra, check=True, **run):
    """`python -m data_prep.preprocess`; a failure fails the test unless check=False. `run`: as
    tests.support.processes.run_command's keyword arguments."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return run_module("data_prep.preprocess", "--input", *inputs, "--tokenizer", tokenizer,
                      "--output-prefix", prefix, "--progress", "none", *extra, check=check, timeout=300, **run)


def same_files(a, b):
    """Whether the indexed datasets at prefixes a and b are the same bytes."""
    for ext in (".bin", ".idx"):
        with open(str(a) + ext, "rb") as fa, open(str(b) + ext, "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def write_jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i}) + "\n")
    return str(path)


def write_jsonl_gz(path, docs, key="text"):
    return write_jsonl(path, docs, key, opener=gzip.open)
