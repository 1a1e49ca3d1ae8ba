"""A real-text corpus with planted duplicates and leaked benchmark questions, and the plain-Python
references (exact Jaccard of word 5-gram sets, 13-gram set overlap) the dedup tests compare with."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, List, Tuple

from tests.eval.eval_helpers import stage_arc, stage_gsm8k
from tests.support.text import license_texts, paragraphs, stdlib_texts

# stdlib packages none of the eval fixtures' questions are built from (tests/eval/eval_helpers.MODULES)
BASE_SLICE = ["email/*.py", "http/*.py", "urllib/*.py", "logging/*.py", "xml/dom/*.py"]
LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3"]
BOILERPLATE = "\n\nShare this page. Subscribe to our newsletter for updates. All rights reserved."


def words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def grams(text: str, n: int) -> set:
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def base_documents(limit: int = 160) -> List[str]:
    """Whole stdlib modules and license paragraphs, of 40+ words, none with a word-5-gram Jaccard
    of 0.3 or more to an earlier one (real text has its own near-copies; the planted ones must be
    the only ones)."""
    docs = [t for t in stdlib_texts(BASE_SLICE) if len(words(t)) >= 40]
    docs += [p for p in paragraphs(license_texts(LICENSES), loose=True) if len(words(p)) >= 40]
    kept, kept_grams = [], []
    for d in docs:
        g = grams(d, 5)
        if all(jaccard(g, k) < 0.3 for k in kept_grams):
            kept.append(d)
            kept_grams.append(g)
        if len(kept) == limit:
            break
    return kept


def near_copy(text: str, rng: random.Random, changes: int = 2) -> str:
    """A few words replaced and boilerplate appended."""
    toks = re.split(r"(\w+)", text)
    idx = [i for i, t in enumerate(toks) if re.fullmatch(r"\w+", t)]
    for i in rng.sample(idx[len(idx) // 4:], changes):
        toks[i] = "replacedword"
    return "".join(toks) + BOILERPLATE


def stage_eval_data(root: Path) -> Path:
    data = root / "eval_data"
    stage_arc(data)
    stage_gsm8k(data)
    return data


def benchmark_questions(data: Path) -> Dict[str, List[dict]]:
    """The staged test/validation rows, read straight from the parquet files."""
    import pyarrow.parquet as pq

    arc = data / "allenai" / "ai2_arc" / "ARC-Challenge"
    gsm = data / "openai" / "gsm8k" / "main"
    return {"arc_challenge": [r for s in ("test", "validation") for r in
                              pq.read_table(str(arc / f"{s}-00000-of-00001.parquet")).to_pylist()],
            "gsm8k": pq.read_table(str(gsm / "test-00000-of-00001.parquet")).to_pylist()}


def example_grams(rows: Dict[str, List[dict]], n: int = 13) -> Dict[str, set]:
    out = {}
    for task, rs in rows.items():
        g = set()
        for r in rs:
            fields = [r["question"], r["answer"]] if task == "gsm8k" else [r["question"]] + list(r["choices"]["text"])
            g |= grams(" ".join(fields), n) if len(words(" ".join(fields))) >= n else set()
        out[task] = g
    return out


def build_corpus(root: Path, data: Path, seed: int = 0) -> dict:
    """Two sources (web: 3 files, books: 2 files) of real documents and what was planted where:
    {"files": {source: [paths]}, "planted": [(source, file, line, kind, original (source, file, line) or task)]}."""
    rng = random.Random(seed)
    base = base_documents()
    hosts, base = base[:5], base[5:]  # documents that appear only with a question pasted in
    web_docs, books_docs = base[: len(base) // 2], base[len(base) // 2:]
    web = [(d, None) for d in web_docs]
    books = [(d, None) for d in books_docs]
    long_docs = [i for i, d in enumerate(web_docs) if len(words(d)) >= 300]
    for i in rng.sample(long_docs, 4):
        web.append((near_copy(web_docs[i], rng, changes=rng.randint(1, 3)), ("near", "web", i)))
    for i in rng.sample(range(len(web_docs)), 4):
        copy = web_docs[i]
        if i % 2:  # differs in case and spacing only: the same after normalisation
            copy = "  " + re.sub(r" +", "   ", copy.upper()) + "\n\n"
        books.append((copy, ("exact", "web", i)))
    qs = benchmark_questions(data)
    for task, k in (("gsm8k", 3), ("arc_challenge", 2)):
        for r in rng.sample([r for r in qs[task] if len(words(r["question"])) >= 16], k):
            host = hosts.pop()
            cut = len(host) // 2
            books.append((host[:cut] + "\n" + r["question"] + "\n" + host[cut:], ("contaminated", task, None)))
    rng.shuffle(web)
    rng.shuffle(books)
    files = {"web": [], "books": []}
    where = {}  # doc -> (source, file, line)
    planted = []
    for name, docs, nfiles in (("web", web, 3), ("books", books, 2)):
        for f in range(nfiles):
            path = root / f"{name}-{f}.jsonl"
            part = docs[f::nfiles]
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d, _ in part))
            files[name].append(str(path))
            for line, (d, tag) in enumerate(part, 1):
                if tag is None:
                    where.setdefault(d, (name, str(path), line))
                planted.append((name, str(path), line, d, tag))
    out = []
    for name, path, line, d, tag in planted:
        if tag is None:
            continue
        kind, a, b = tag
        if kind == "contaminated":
            out.append((name, path, line, kind, a))
            continue
        order = {p: i for i, p in enumerate(files["web"] + files["books"])}  # plan order: the first is kept
        first, later = sorted([where[web_docs[b]], (name, path, line)], key=lambda x: (order[x[1]], x[2]))
        out.append(later + (kind, first))
    return {"files": files, "planted": out, "documents": [d for d, _ in web] + [d for d, _ in books]}


def plan_yaml(root: Path, corpus: dict, tokenizer: str, data: Path, extra_stage: str = "", action: str = "drop") -> Path:
    src = lambda name, w: f"      - {{name: {name}, globs: {json.dumps(corpus['files'][name])}, weight: {w}}}\n"  # noqa
    text = (f"output_dir: {root / 'out'}\ntokenizer: {{model: {tokenizer}}}\npreprocess: {{workers: 2}}\n"
            f"stages:\n  stage1:\n    token_budget: 100000\n    sources:\n" + src("web", 0.6) + src("books", 0.4) +
            f"    dedup: {{threshold: 0.8}}\n"
            f"    decontaminate: {{data_dir: {data}, tasks: [arc_challenge, gsm8k], action: {action}}}\n" + extra_stage)
    p = root / "plan.yaml"
    p.write_text(text)
    return p


def dropped(out_dir: Path, stage: str, source: str) -> List[dict]:
    p = out_dir / stage / f"{source}.dropped.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()]


def key(rec: dict) -> Tuple[str, int]:
    return rec["file"], rec["line"]
