"""`megafox info --blend data/<stage>/blend.json`: what a stage's data holds and what the data
plan's dedup / decontamination removed from it (data_prep/dedup.py writes the counts)."""
from __future__ import annotations

import json
import os
from typing import List

from megafox.config import ConfigError


def format_blend(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            blend = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--blend {path}: not a readable blend.json ({exc})") from None
    if not isinstance(blend, dict) or not isinstance(blend.get("datasets"), list):
        raise ConfigError(f"--blend {path}: expected a blend.json with a 'datasets' list")
    lines: List[str] = [f"data: {path} (stage {blend.get('stage', '?')})",
                        "| dataset | documents | tokens | exact dups removed | near dups removed | contaminated |",
                        "| --- | --- | --- | --- | --- | --- |"]
    for d in blend["datasets"]:
        r = d.get("removed")
        cells = ["-", "-", "-"] if r is None else [
            f"{r.get('exact_duplicate', 0):,}", f"{r.get('near_duplicate', 0):,}",
            f"{r.get('contaminated', 0):,} dropped" + (f", {r['contaminated_reported']:,} kept"
                                                        if r.get("contaminated_reported") else "")]
        lines.append(f"| {d.get('prefix')} | {d.get('documents', '?'):,} | {d.get('tokens', '?'):,} | "
                     + " | ".join(cells) + " |")
    dd = blend.get("dedup")
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
