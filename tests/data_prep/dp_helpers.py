import glob
import gzip
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np

STDLIB = sysconfig.get_paths()["stdlib"]
SLICE = ["email/*.py", "json/*.py", "http/*.py", "html/*.py", "urllib/*.py"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(module, *args, check=True):
    """Run `python -m module args` as a user would; returns CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{module} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def pp(inputs, tokenizer, prefix, *extra, check=True):
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return run_cli("data_prep.preprocess", "--input", *inputs, "--tokenizer", tokenizer,
                   "--output-prefix", prefix, "--progress", "none", *extra, check=check)


def read_megatron(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))], ds


def expected(sp, docs, eod=True):
    return [sp.encode(d) + ([sp.eos_id()] if eod else []) for d in docs]


def same_files(a, b):
    for ext in (".bin", ".idx"):
        with open(str(a) + ext, "rb") as fa, open(str(b) + ext, "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def stdlib_files(patterns=SLICE):
    out = []
    for pat in patterns:
        out += sorted(glob.glob(os.path.join(STDLIB, pat)))
    assert out, f"no stdlib sources under {STDLIB}"
    return out


def write_jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i}) + "\n")
    return str(path)


def write_jsonl_gz(path, docs, key="text"):
    return write_jsonl(path, docs, key, opener=gzip.open)
