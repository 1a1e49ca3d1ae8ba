"""Benchmark n-gram index for decontamination (a stage's `decontaminate:` section).

The evaluation examples are read exactly as `megafox eval` reads them: the lm_eval tasks of
`--suite fox1` and/or named tasks and task YAML files, their data from the same offline directory
(`megafox eval --data-dir`, megafox/eval/tasks.py), every test and validation document rendered
with the task's own `doc_to_text` plus its gold answer.  Each example's word n-grams (13 by
default, as GPT-3 reports; words as data_prep.minhash.words) go into one sorted uint64 array,
with the task and example they come from.  Examples shorter than n words cannot be checked this
way and are counted as such in the report.

megafox.eval.tasks imports lm_eval (and with it torch) only when the index is built, once per run in
the main process; the index file is reused while the tasks, data files and n are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megafox.config import ConfigError
from megafox.eval.suites import parse_task, suite as suite_specs
from megafox.eval.tasks import load_tasks, offline_environment, require_lm_eval, task_manager

from .common import DataPrepError, file_stat
from megafox.runtime.fs import atomic_write_bytes
from .minhash import ngram_hashes, ngrams_many, word_hashes

INDEX_VERSION = 1


def _task_specs(suite: Optional[str], tasks: Sequence[str]):
    try:
        specs = list(suite_specs(suite)) if suite else []
        specs += [parse_task(t, "decontaminate.tasks") for t in tasks]
    except ConfigError as e:
        raise DataPrepError(str(e)) from None
    return specs


def _example_text(task, doc) -> str:
    """What the model is shown for `doc` plus the gold answer (int targets index the choices)."""
    choices = None
    if getattr(task, "OUTPUT_TYPE", None) == "multiple_choice" or task.config.output_type == "multiple_choice":
        choices = task.doc_to_choice(doc)
    text = task.doc_to_text(doc)
    if isinstance(text, int) and choices and 0 <= text < len(choices):
        text = choices[text]  # winogrande-style: the context is one of the choices
    target = task.doc_to_target(doc)
    if isinstance(target, int) and choices and 0 <= target < len(choices):
        target = choices[target]
    if isinstance(target, (list, tuple)):
        target = " ".join(map(str, target))
    return f"{text} {target}"


def benchmark_examples(suite: Optional[str], tasks: Sequence[str], data_dir: Optional[str]) -> Dict[str, List[str]]:
    """{leaf task name: [example text, ...]} of every test and validation document."""
    offline_environment()
    specs = _task_specs(suite, tasks)
    try:
        require_lm_eval()
        loaded = load_tasks(task_manager(specs), specs, data_dir)
    except ConfigError as e:
        raise DataPrepError(f"decontaminate: {e}") from None
    out: Dict[str, List[str]] = {}
    for lt in loaded:
        for obj in lt.objects:
            for name, task in _leaf_tasks(obj, lt):
                docs = []
                try:
                    if task.has_test_docs():
                        docs += list(task.test_docs())
                    if task.has_validation_docs():
                        docs += list(task.validation_docs())
                    out[name] = [_example_text(task, d) for d in docs]
                except Exception as e:  # a task's own templates failing on its own data
                    raise DataPrepError(f"decontaminate: task {name}: cannot render its examples "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return out


def _leaf_tasks(obj, lt) -> List[Tuple[str, object]]:
    if hasattr(obj, "test_docs"):
        return [(obj.config.task, obj)]
    return sorted(((t.config.task, t) for t in obj.get_all_tasks(recursive=True)), key=lambda x: x[0])


def _data_fingerprint(data_dir: Optional[str], tasks: Sequence[str]) -> List:
    files = []
    roots = ([data_dir] if data_dir else []) + [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for root in roots:
        if os.path.isfile(root):
            st = file_stat(root)
            files.append([root, st["size"], st["mtime_ns"]])
            continue
        for d, _, names in sorted(os.walk(root)):
            for n in sorted(names):
                p = os.path.join(d, n)
                st = file_stat(p)
                files.append([p, st["size"], st["mtime_ns"]])
    return files


class BenchmarkIndex:
    def __init__(self, ngrams, task, example, names, examples, short, n):
        self.ngrams, self.task, self.example = ngrams, task, example
        self.names, self.examples, self.short, self.n = names, examples, short, n

    @classmethod
    def build(cls, examples: Dict[str, List[str]], n: int) -> "BenchmarkIndex":
        grams, tid, eid = [], [], []
        names = sorted(examples)
        short = []
        for t, name in enumerate(names):
            k = 0
            for e, text in enumerate(examples[name]):
                g = np.unique(ngram_hashes(word_hashes(text), n))
                if not len(g):
                    k += 1
                    continue
                grams.append(g)
                tid.append(np.full(len(g), t, np.int32))
                eid.append(np.full(len(g), e, np.int32))
            short.append(k)
        g = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        t = np.concatenate(tid) if tid else np.zeros(0, np.int32)
        e = np.concatenate(eid) if eid else np.zeros(0, np.int32)
        order = np.lexsort((e, t, g))
        return cls(g[order], t[order], e[order], names, [len(examples[x]) for x in names], short, n)

    def save(self, path: str, signature: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, ngrams=self.ngrams, task=self.task, example=self.example,
                 meta=np.frombuffer(json.dumps({"names": self.names, "examples": self.examples, "short": self.short,
                                                "n": self.n, "signature": signature}).encode(), np.uint8))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str, signature: Optional[dict] = None) -> Optional["BenchmarkIndex"]:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if signature is not None and meta["signature"] != signature:
                    return None
                return cls(z["ngrams"], z["task"], z["example"], meta["names"], meta["examples"], meta["short"],
                           meta["n"])
        except (OSError, ValueError, KeyError):
            return None

    def digest(self) -> str:
        h = hashlib.sha256(self.ngrams.tobytes())
        h.update(self.task.tobytes())
        h.update(json.dumps(self.names).encode())
        return h.hexdigest()[:16]

    def hits_many(self, wh: np.ndarray, counts: np.ndarray) -> List[Tuple[int, int, int]]:
        """(document, task, example) for several documents' concatenated word hashes, sorted."""
        if not len(self.ngrams):
            return []
        g, d = ngrams_many(wh, counts, self.n, short_whole=False)
        if not len(g):
            return []
        pos = np.searchsorted(self.ngrams, g)
        pos[pos == len(self.ngrams)] = 0
        m = self.ngrams[pos] == g
        out = set()
        for x, doc in set(zip(g[m].tolist(), d[m].tolist())):
            lo = np.searchsorted(self.ngrams, np.uint64(x), "left")
            hi = np.searchsorted(self.ngrams, np.uint64(x), "right")
            out.update((doc, t, e) for t, e in zip(self.task[lo:hi].tolist(), self.example[lo:hi].tolist()))
        return sorted(out)

    def hits(self, wh: np.ndarray) -> List[Tuple[int, int]]:
        """Distinct (task, example) pairs sharing an n-gram with a document's word hashes."""
        if not len(self.ngrams):
            return []
        g = ngram_hashes(wh, self.n)
        if not len(g):
            return []
        pos = np.searchsorted(self.ngrams, g)
        pos[pos == len(self.ngrams)] = 0
        found = np.unique(g[self.ngrams[pos] == g])
        out = set()
        for x in found:
            lo = np.searchsorted(self.ngrams, x, "left")
            hi = np.searchsorted(self.ngrams, x, "right")
            out.update(zip(self.task[lo:hi].tolist(), self.example[lo:hi].tolist()))
        return sorted(out)


def load_or_build(path: str, settings: dict) -> BenchmarkIndex:
    """The index for a stage's `decontaminate:` settings, from `path` when still current."""
    sig = {"version": INDEX_VERSION, "suite": settings["suite"], "tasks": list(settings["tasks"]),
           "data_dir": settings["data_dir"], "ngram": settings["ngram"],
           "files": _data_fingerprint(settings["data_dir"], settings["tasks"])}
    idx = BenchmarkIndex.load(path, sig)
    if idx is None:
        idx = BenchmarkIndex.build(benchmark_examples(settings["suite"], settings["tasks"], settings["data_dir"]),
                                   settings["ngram"])
        if not len(idx.ngrams):
            raise DataPrepError(f"decontaminate: the tasks ({', '.join(idx.names) or 'none'}) have no test or "
                                f"validation example of {settings['ngram']} words or more")
        idx.save(path, sig)
    return idx
