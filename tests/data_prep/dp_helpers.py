"""data_prep's preprocessing CLI as a user runs it, its inputs (JSONL, gzipped JSONL), the
byte-for-byte comparison of two outputs, and another writer holding an output's lock."""
import contextlib
import gzip
import json
import os
import subprocess

from tests.support.processes import REPO, clean_env, python_command, run_module

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


@contextlib.contextmanager
def lock_held_elsewhere(prefix):
    """Another process holding PREFIX's writer lock (data_prep.common.output_lock) while the block
    runs; yields its Popen (killed at the end, which releases the lock)."""
    holder = subprocess.Popen(
        python_command("-c", "import sys, time\nfrom data_prep.common import output_lock\n"
                       "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n",
                       prefix),
        env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
