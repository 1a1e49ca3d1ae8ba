"""Run lm_eval over loaded tasks, one task at a time, and read each task's score.

One task per `simple_evaluate` call: progress (and a partial results file) per task, and a
failure in task 5 keeps tasks 1-4. Only the process that drives the model calls this.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from megafox.eval.tasks import LoadedTask

# A task's metric when the spec does not name one: what the leaderboard reports for such tasks
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "f1", "bleu", "word_perplexity", "perplexity")
FILTER_PREFERENCE = ("strict-match", "none")


@dataclass
class TaskResult:
    task: str  # lm_eval's task / group name
    label: str
    shots: Optional[int]  # as lm_eval used it (the YAML's num_fewshot when not given); None: varies by subtask
    metric: str
    filter: str
    value: Optional[float]  # 0..1 as lm_eval reports it
    stderr: Optional[float]
    samples: int  # documents scored
    seconds: float
    aggregation: str = "lm_eval"  # or "subject_mean" (the leaderboard's MMLU)
    metrics: Dict[str, Any] = field(default_factory=dict)  # everything lm_eval reported for the task
    leaves: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per-subtask metrics of a group


def quiet_lm_eval() -> None:
    """lm_eval logs every task's set-up at INFO; keep its warnings."""
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def lm_eval_progress(shown: bool):
    """lm_eval draws bars of its own (building a task's requests, the hf model's batches, bootstrap
    standard errors) and takes no switch for them; several set `disable` themselves. Without
    `shown`, the `tqdm` its modules call is one that is always disabled, for this block only."""
    if shown:
        yield
        return
    import tqdm as package

    class Silent(package.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    # the package attribute serves lm_eval's function-local `from tqdm import tqdm`
    modules = [package] + [sys.modules[name] for name in ("lm_eval.api.task", "lm_eval.api.model",
                                                          "lm_eval.models.huggingface") if name in sys.modules]
    saved = [(module, module.tqdm) for module in modules if hasattr(module, "tqdm")]
    for module, _ in saved:
        module.tqdm = Silent
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def evaluate_task(lm, task: LoadedTask, tm, limit: Optional[int] = None, log_samples: bool = False,
                  bootstrap_iters: int = 100000, gen_kwargs: Optional[str] = None,
                  progress: bool = True) -> (TaskResult, Dict[str, Any]):
    """One task (or group) through lm_eval's `simple_evaluate`; its result and lm_eval's raw output.
    `gen_kwargs` ("max_gen_toks=64,...") updates generation tasks' settings, as lm_eval's --gen_kwargs.
    `progress`: whether lm_eval's own progress bars are drawn."""
    from lm_eval import simple_evaluate

    start = time.monotonic()
    with lm_eval_progress(progress):
        raw = simple_evaluate(model=lm, tasks=list(task.objects), task_manager=tm, limit=limit,
                              log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                              gen_kwargs=gen_kwargs or None)
    seconds = time.monotonic() - start
    return read_result(task, raw, seconds), raw


def read_result(task: LoadedTask, raw: Dict[str, Any], seconds: float) -> TaskResult:
    spec = task.spec
    results = raw["results"]
    own = results.get(task.name, {}) if task.kind != "tag" else {}
    leaves = {leaf: _numbers(results.get(leaf, {})) for leaf in task.leaves}
    metric, filt = primary_metric(own or next(iter(leaves.values()), {}), spec.metric, spec.filter)
    samples = sum(int(raw.get("n-samples", {}).get(leaf, {}).get("effective", 0)) for leaf in task.leaves)
    key, err = f"{metric},{filt}", f"{metric}_stderr,{filt}"
    aggregation = "lm_eval"
    if spec.subject_mean or task.kind == "tag" or key not in own:
        values = [v[key] for v in leaves.values() if key in v]
        errors = [v.get(err) for v in leaves.values() if key in v]
        value = sum(values) / len(values) if values else None
        stderr = (math.sqrt(sum(e * e for e in errors)) / len(errors)
                  if errors and all(isinstance(e, float) for e in errors) else None)
        aggregation = "subject_mean" if len(values) > 1 else aggregation
    else:
        value, stderr = own.get(key), own.get(err)
    if task.kind != "group" and len(task.leaves) == 1:
        leaves = {}
    # a task YAML's row is named by the task it defines, not by the file's path
    return TaskResult(task=task.name, label=spec.label or task.name, shots=_shots(task, raw), metric=metric,
                      filter=filt, value=_finite(value), stderr=_finite(stderr), samples=samples,
                      seconds=round(seconds, 2),
                      aggregation=aggregation, metrics=_numbers(own), leaves=leaves)


def _shots(task: LoadedTask, raw: Dict[str, Any]) -> Optional[int]:
    """The few-shot count lm_eval used: the requested one, else its record per leaf (the task
    YAML's num_fewshot, 0 when it has none) when all leaves agree."""
    if task.spec.shots is not None:
        return task.spec.shots
    used = {raw.get("n-shot", {}).get(leaf) for leaf in task.leaves}
    if len(used) == 1 and isinstance(next(iter(used)), int):
        return next(iter(used))
    return None


def primary_metric(reported: Dict[str, Any], metric: Optional[str], filt: str) -> (str, str):
    """(metric, filter) to read: the spec's, else the first of METRIC_PREFERENCE the task reports."""
    keys = [k for k in reported if "," in k and "_stderr" not in k]
    if metric is not None:
        return metric, filt
    for wanted in METRIC_PREFERENCE:
        for f in FILTER_PREFERENCE + tuple(k.split(",", 1)[1] for k in keys):
            if f"{wanted},{f}" in reported:
                return wanted, f
    if keys:
        name, f = keys[0].split(",", 1)
        return name, f
    return "acc", "none"


def _numbers(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: _finite(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finite(value):
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def samples_records(raw: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """lm_eval's per-document records (log_samples), JSON-ready."""
    import json

    out = {}
    for task, records in (raw.get("samples") or {}).items():
        out[task] = [json.loads(json.dumps(r, default=str)) for r in records]
    return out


def run_tasks(lm, tasks: List[LoadedTask], tm, limit: Optional[int] = None, log_samples: bool = False,
              bootstrap_iters: int = 100000, gen_kwargs: Optional[str] = None, announce: Callable[[str], None] = print,
              on_result: Optional[Callable[[TaskResult, Dict[str, Any]], None]] = None,
              progress: bool = True) -> List[TaskResult]:
    results = []
    for i, task in enumerate(tasks, 1):
        shots = "default shots" if task.spec.shots is None else f"{task.spec.shots}-shot"
        announce(f"[{i}/{len(tasks)}] {task.name} ({shots}{', limit ' + str(limit) if limit else ''}): evaluating")
        result, raw = evaluate_task(lm, task, tm, limit, log_samples, bootstrap_iters, gen_kwargs, progress)
        shown = "n/a" if result.value is None else f"{result.value:.4f}"
        err = "" if result.stderr is None else f" +- {result.stderr:.4f}"
        announce(f"[{i}/{len(tasks)}] {task.name}: {result.metric} ({result.filter}) = {shown}{err} "
                 f"over {result.samples} documents in {result.seconds:.1f}s")
        results.append(result)
        if on_result is not None:
            on_result(result, raw)
    return results
