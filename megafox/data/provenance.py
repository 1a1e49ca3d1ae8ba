"""`megafox info --blend data/<stage>/blend.json`: what a stage's data holds and what the data
plan's dedup / decontamination removed from it (data_prep/dedup.py writes the counts)."""
from __future__ import annotations

import json
import os
from typing import List

from megafox.config import ConfigError
from megafox.formats import FormatError
from megafox.formats.blend import BlendRecord


def format_blend(path: str) -> str:
    try:
        blend = BlendRecord.read(path)
    except FormatError as exc:
        raise ConfigError(f"--blend {exc}") from None
    lines: List[str] = [f"data: {path} (stage {blend.stage})",
                        "| dataset | documents | tokens | exact dups removed | near dups removed | contaminated |",
                        "| --- | --- | --- | --- | --- | --- |"]
    for d in blend.datasets:
        r = d.removed
        cells = ["-", "-", "-"] if r is None else [
            f"{r.get('exact_duplicate', 0):,}", f"{r.get('near_duplicate', 0):,}",
            f"{r.get('contaminated', 0):,} dropped" + (f", {r['contaminated_reported']:,} kept"
                                                        if r.get("contaminated_reported") else "")]
        lines.append(f"| {d.prefix} | {_count(d.documents)} | {_count(d.tokens)} | "
                     + " | ".join(cells) + " |")
    dd = blend.dedup
    if not dd:
        lines.append("no dedup / decontamination in this stage's data plan (docs/data_quality.md)")
        return "\n".join(lines)
    report = os.path.join(os.path.dirname(os.path.abspath(path)), dd.get("report", "dedup_report.json"))
    try:
        with open(report, encoding="utf-8") as f:
            bench = json.load(f).get("benchmarks", {})
    except (OSError, ValueError):
        bench = {}
    for name, b in sorted(bench.items()):
        lines.append(f"benchmark {name}: {b['examples_found']} of {b['examples']} examples found in "
                     f"{b['documents']:,} training documents")
    return "\n".join(lines)


def _count(n) -> str:
    return "?" if n is None else f"{n:,}"
