"""What `megafox eval` writes: a results JSON and a markdown table beside the published Fox-1 numbers."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from megafox.eval.runner import TaskResult
from megafox.eval.suites import PUBLISHED, SUITES
from megafox.runtime.fs import atomic_write_bytes

FORMAT = "megafox-eval-v1"


def is_fraction(metric: str) -> bool:
    """Whether `metric` is a 0..1 score (accuracy, exact match, F1...) shown in percent; perplexity-
    type metrics (word/byte perplexity, bits per byte: lower is better, unbounded) are not, so
    they are shown as values and kept out of the average."""
    return not (metric.endswith("perplexity") or metric == "bits_per_byte")


def average(results: List[TaskResult], suite: Optional[str]) -> Dict[str, Any]:
    """The unweighted mean of the tasks' 0..1 scores (the leaderboard's average; perplexities are
    not averaged with accuracies); `complete` when every task of the suite has a score."""
    scored = [r for r in results if r.value is not None and is_fraction(r.metric)]
    expected = [s.name for s in SUITES[suite]] if suite else [r.task for r in results]
    have = {r.task for r in results if r.value is not None}
    return {"value": sum(r.value for r in scored) / len(scored) if scored else None,
            "tasks": [r.task for r in scored], "complete": all(name in have for name in expected)}


def build_report(results: List[TaskResult], model: Dict[str, Any], settings: Dict[str, Any],
                 suite: Optional[str], lm_eval_version: str, lm_eval_raw: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "lm_eval_version": lm_eval_version,
        "suite": suite,
        "settings": settings,
        "tasks": [dataclasses.asdict(r) for r in results],
        "average": average(results, suite),
        "published": PUBLISHED if suite == "fox1" else {},
        "lm_eval": lm_eval_raw,  # per task: lm_eval's configs (prompts, splits), versions, n-samples
    }


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown(report: Dict[str, Any]) -> str:
    model, settings = report["model"], report["settings"]
    published = report["published"]
    where = f"`{model.get('path')}`"
    if model.get("iteration") is not None:
        where += f", iteration {model['iteration']}"
    if model.get("consumed_tokens"):
        where += f" ({model['consumed_tokens']:,} tokens)"
    lines = [f"# Evaluation of {model.get('name', 'model')}", "",
             f"{model.get('kind', 'model')} {where}; lm_eval {report['lm_eval_version']}; "
             f"{settings.get('layout', '')} {settings.get('dtype', '')}".rstrip() + ".", ""]
    if settings.get("limit"):
        lines += [f"**At most {settings['limit']} documents per task: not comparable with published scores.**", ""]
    if settings.get("gen_kwargs"):
        lines += [f"**Generation settings changed ({settings['gen_kwargs']}): not comparable with published scores.**",
                  ""]
    head = ["Task", "Shots", "Metric", "This model", "±"] + [f"{name} (published)" for name in published]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---", "---:", "---", "---:", "---:"]
                                                                   + ["---:"] * len(published)) + " |"]
    for row in report["tasks"]:
        metric = row["metric"] + ("" if row["filter"] == "none" else f" ({row['filter']})")
        if row["aggregation"] == "subject_mean":
            metric += ", mean of subjects"
        shots = "varies" if row["shots"] is None else str(row["shots"])
        shown = _pct if is_fraction(row["metric"]) else _value
        cells = [row["label"], shots, metric, shown(row["value"]), shown(row["stderr"])]
        cells += [_num(published[name].get(row["task"])) for name in published]
        lines.append("| " + " | ".join(cells) + " |")
    avg = report["average"]
    averaged = [row for row in report["tasks"] if is_fraction(row["metric"])]
    if len(averaged) > 1:
        note = "" if avg["complete"] else " (incomplete)"
        cells = [f"**Average**{note}", "", "", _pct(avg["value"]), ""]
        for name in published:
            scores = published[name]
            full = all(row["task"] in scores for row in averaged)
            cells.append(_num(sum(scores[row["task"]] for row in averaged) / len(averaged)) if full else "-")
        lines.append("| " + " | ".join(cells) + " |")
    units = "Scores in percent"
    if len(averaged) < len(report["tasks"]):
        units = "Accuracy-type scores in percent, perplexity-type as values (not averaged)"
    lines += ["", f"{units}; ± is lm_eval's standard error. Documents: "
              + ", ".join(f"{row['task']} {row['samples']}" for row in report["tasks"]) + "."]
    return "\n".join(lines) + "\n"


def _value(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def json_safe(value):
    """Valid JSON: NaN/inf become null, anything else unknown becomes its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_report(report: Dict[str, Any], json_path: Path, md_path: Optional[Path]) -> None:
    atomic_write_bytes(str(json_path), (json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n").encode())
    if md_path is not None:
        atomic_write_bytes(str(md_path), markdown(report).encode())


def write_samples(directory: Path, task: str, records: List[Dict[str, Any]]) -> Path:
    path = directory / f"{task}.jsonl"
    atomic_write_bytes(str(path), "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records).encode())
    return path
