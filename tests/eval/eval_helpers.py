"""Offline test material for the evaluation tests, all built from real text on this machine
(the tokenizer: tests.support.tokenizers on standard-library sources, in conftest.py):

* `allenai/ai2_arc` staged like a copy of the HF repo (README configs + parquet), in ARC's schema,
  whose questions ask which standard-library function a real docstring describes;
* `openai/gsm8k` staged the same way, GSM8K-shaped ("... #### 9") arithmetic questions about real
  counts of public functions in standard-library modules;
* a small local task YAML (a docstring multiple-choice task in lm_eval's format) for the in-loop
  evaluator, whose tests must not pay for indexing lm_eval's whole registry;
* a small random Llama whose next-token distributions are sharply peaked (so an off-by-one in the
  scored positions changes log-likelihoods by whole nats, not by 1e-6), as an HF directory.
"""
from __future__ import annotations

import inspect
import json
import random
from pathlib import Path
from typing import Dict, List

from tests.support.processes import clean_env, run_module, torchrun

MODULES = ["textwrap", "json", "difflib", "string", "shlex", "fnmatch", "glob", "posixpath", "base64",
           "heapq", "bisect", "statistics", "calendar", "copy", "functools", "itertools", "operator",
           "random", "re", "tempfile", "shutil", "zipfile", "tarfile", "csv", "gzip", "hashlib", "hmac",
           "html", "ipaddress", "keyword", "linecache", "locale", "mimetypes", "netrc", "pprint", "quopri",
           "secrets", "sched", "stat", "struct", "tokenize", "warnings", "wave", "weakref", "zlib"]


def _public_functions(module_name: str):
    import importlib

    module = importlib.import_module(module_name)
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
            continue
        doc = (inspect.getdoc(obj) or "").strip().split("\n")[0].strip()
        if 20 <= len(doc) <= 160:
            out.append((name, doc))
    return out


def docstring_questions(seed: int = 0) -> List[Dict]:
    """'Which function does this docstring describe?' with four functions of the same module."""
    rng = random.Random(seed)
    rows = []
    for module in MODULES:
        funcs = _public_functions(module)
        if len(funcs) < 4:
            continue
        for name, doc in funcs:
            others = rng.sample([f for f, _ in funcs if f != name], 3)
            choices = others + [name]
            rng.shuffle(choices)
            rows.append({"module": module, "docstring": doc, "choices": choices, "answer": choices.index(name)})
    rng.shuffle(rows)
    return rows


def arithmetic_questions(count: int = 60, seed: int = 0) -> List[Dict]:
    """GSM8K-shaped word problems on real counts: '<reasoning>\\n#### <number>' answers."""
    rng = random.Random(seed)
    counts = {m: len(_public_functions(m)) for m in MODULES}
    counts = {m: c for m, c in counts.items() if c > 0}
    names = sorted(counts)
    rows = []
    for _ in range(count):
        a, b = rng.sample(names, 2)
        x, y = counts[a], counts[b]
        if rng.random() < 0.5:
            q = (f"The {a} module of the Python standard library documents {x} public functions and the {b} "
                 f"module documents {y}. How many documented public functions do the two modules have together?")
            ans = f"The {a} module has {x} and the {b} module has {y}, so together they have {x} + {y} = {x + y}.\n#### {x + y}"
        else:
            k = rng.randint(2, 5)
            q = (f"A reviewer reads the {x} documented public functions of the {a} module {k} times. "
                 f"How many function readings is that?")
            ans = f"Each pass covers {x} functions and there are {k} passes, so {x} * {k} = {x * k}.\n#### {x * k}"
        rows.append({"question": q, "answer": ans})
    return rows


def _write_parquet(path: Path, rows: List[Dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _readme(configs: Dict[str, List[str]]) -> str:
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    return "\n".join(lines + ["---", "", "Staged for megafox's evaluation tests.", ""])


def stage_arc(data_dir: Path) -> Path:
    """<data_dir>/allenai/ai2_arc as `hf download allenai/ai2_arc` lays it out (ARC-Challenge only)."""
    root = data_dir / "allenai" / "ai2_arc"
    rows = docstring_questions()
    arc = [{"id": f"doc-{i}", "question": f"Which {r['module']} function is described as: {r['docstring']}",
            "choices": {"text": r["choices"], "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[r["answer"]]}
           for i, r in enumerate(rows)]
    splits = {"train": arc[:40], "validation": arc[40:60], "test": arc[60:]}
    for split, part in splits.items():
        _write_parquet(root / "ARC-Challenge" / f"{split}-00000-of-00001.parquet", part)
    (root / "README.md").write_text(_readme({"ARC-Challenge": list(splits)}))
    return root


def stage_gsm8k(data_dir: Path) -> Path:
    """<data_dir>/openai/gsm8k as `hf download openai/gsm8k` lays it out (config main)."""
    root = data_dir / "openai" / "gsm8k"
    rows = arithmetic_questions()
    for split, part in {"train": rows[:20], "test": rows[20:]}.items():
        _write_parquet(root / "main" / f"{split}-00000-of-00001.parquet", part)
    (root / "README.md").write_text(_readme({"main": ["train", "test"]}))
    return root


DOCSTRING_TASK = """task: docstring_mc
dataset_path: docstring_mc
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Docstring: {{docstring}}\\nFunction:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def stage_docstring_task(task_dir: Path, data_dir: Path) -> Path:
    """A task YAML in lm_eval's format + its data under <data_dir>/docstring_mc/ (train/test jsonl)."""
    rows = docstring_questions(seed=1)
    root = data_dir / "docstring_mc"
    root.mkdir(parents=True, exist_ok=True)
    for split, part in {"train": rows[:20], "test": rows[20:]}.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / "docstring_mc.yaml"
    path.write_text(DOCSTRING_TASK)
    return path


def tiny_model(vocab_size: int = 1000):
    from megafox.config import fox1_tiny

    model = fox1_tiny()
    model.vocab_size = vocab_size
    return model


def peaked_hf_state(model, seed: int = 0):
    """A random Llama state dict whose logits spread over several nats (embeddings x 12)."""
    from tests.support.hf_reference import hf_state

    state = hf_state(model, seed)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 12.0
    return state


def save_hf_dir(model, out_dir: Path, seed: int = 0) -> Path:
    from tests.support.hf_reference import hf_llama

    hf = hf_llama(model, seed)
    hf.load_state_dict(peaked_hf_state(model, seed))
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def run_eval(*args, nproc: int = 1, timeout: float = 600, extra_env=None):
    """`megafox eval ARGS` in one process, or under torchrun with `nproc` ranks."""
    env = clean_env(**(extra_env or {}))
    if nproc == 1:
        return run_module("megafox.cli", "eval", *args, env=env, timeout=timeout)
    return torchrun(nproc, "-m", "megafox.cli", "eval", *args, env=env, timeout=timeout)


def sharp_attention_state(model, seed: int = 6):
    """A random Llama state dict whose attention is sharp (q/k/v/o x 8), so greedy generations
    depend on which positions a token attends to and how far away they are (a plain random model
    repeats one token whatever it attends to); seed 6's top-2 logits stay >= 2e-3 apart on
    test_ragged_generation's prompts, far above float32 noise."""
    from tests.support.hf_reference import hf_state

    state = hf_state(model, seed)
    for name, tensor in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            tensor.mul_(8.0)
    return state
