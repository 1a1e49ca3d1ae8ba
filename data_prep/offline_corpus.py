"""Gather a real corpus that is reachable offline into JSONL, split into curriculum stage sets.

Sources: the Python documentation (reST prose from Debian's python3.X-doc package, fetched with
`apt-get download`, the only network this needs) and the CPython standard library sources on
this machine. Used by `make demo`; any machine with Debian's package index works.

    python -m data_prep.offline_corpus --output demo_out/corpus --max-mb 6

writes OUTPUT/stage1/docs.jsonl (prose), OUTPUT/stage2/{docs,code}.jsonl (prose + code) and
OUTPUT/stage3/{docs,code}.jsonl (the longest documents, for the longest sequence length), with
disjoint documents in each stage, chosen deterministically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple


def python_docs(cache: Path) -> List[Tuple[str, str]]:
    """(name, text) of the Python documentation's reST sources; downloads the .deb once."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = cache / "python-doc"
    sources = list(root.glob("usr/share/doc/python*/html/_sources/**/*.rst.txt"))
    if not sources:
        root.mkdir(parents=True, exist_ok=True)
        debs = list(cache.glob("python3*-doc_*.deb"))
        if not debs:
            for package in (f"python{version}-doc", "python3-doc"):
                done = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
                debs = list(cache.glob("python3*-doc_*.deb"))
                if debs:
                    break
            if not debs:
                raise SystemExit(f"offline_corpus: could not fetch python{version}-doc with apt-get download: "
                                 f"{done.stderr.strip()[-300:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        sources = list(root.glob("usr/share/doc/python*/html/_sources/**/*.rst.txt"))
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in sorted(sources)]


def stdlib_code() -> List[Tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():  # empty __init__.py files carry nothing to learn
            files.append((str(rel), text))
    return files


def _pick(docs: List[Tuple[str, str]], budget_bytes: int, salt: str) -> List[Tuple[str, str]]:
    """A deterministic pseudo-random subset within a byte budget."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256((salt + d[0]).encode()).hexdigest())
    out, used = [], 0
    for name, text in ranked:
        if used + len(text) > budget_bytes:
            continue
        out.append((name, text))
        used += len(text)
    return out


def split_stages(prose, code, max_bytes: int) -> Dict[str, Dict[str, List[Tuple[str, str]]]]:
    """stage1: prose; stage2: prose + code; stage3: long documents of both. Disjoint."""
    long_prose = [d for d in prose if len(d[1]) >= 20_000]
    long_code = [d for d in code if len(d[1]) >= 20_000]
    short_prose = [d for d in prose if len(d[1]) < 20_000]
    short_code = [d for d in code if len(d[1]) < 20_000]
    third = max_bytes // 3
    stage1 = _pick(short_prose, third, "s1")
    taken = {name for name, _ in stage1}
    return {
        "stage1": {"docs": stage1},
        "stage2": {"docs": _pick([d for d in short_prose if d[0] not in taken], third // 2, "s2"),
                   "code": _pick(short_code, third // 2, "s2")},
        "stage3": {"docs": _pick(long_prose, third // 2, "s3"), "code": _pick(long_code, third // 2, "s3")},
    }


def write_jsonl(path: Path, docs: List[Tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for name, text in docs:
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--cache", default=None, help="where the downloaded doc package is kept (default OUTPUT/../raw)")
    parser.add_argument("--max-mb", type=float, default=6.0, help="total corpus size across the stages")
    args = parser.parse_args(argv)
    out = Path(args.output)
    cache = Path(args.cache) if args.cache else out.parent / "raw"
    cache.mkdir(parents=True, exist_ok=True)
    stages = split_stages(python_docs(cache), stdlib_code(), int(args.max_mb * 1e6))
    for stage, sources in stages.items():
        for source, docs in sources.items():
            write_jsonl(out / stage / f"{source}.jsonl", docs)
            size = sum(len(t) for _, t in docs)
            print(f"corpus: {stage}/{source}.jsonl  {len(docs)} documents, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
