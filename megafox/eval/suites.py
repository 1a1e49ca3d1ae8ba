"""What to evaluate: task specs (`name[:shots]`) and the `fox1` suite.

`fox1` is the Fox-1 report's table, "the Open LLM Leaderboard's evaluation setup" (v1): each
task at the leaderboard's shot count and metric, and their unweighted average.

| task | shots | metric (lm_eval key) |
| --- | --- | --- |
| arc_challenge | 25 | acc_norm |
| hellaswag | 10 | acc_norm |
| truthfulqa_mc2 | 0 | acc (= mc2) |
| mmlu | 5 | acc, the mean of its 57 subjects (the leaderboard's MMLU; lm_eval's own group score weights subjects by size and is kept too) |
| winogrande | 5 | acc |
| gsm8k | 5 | exact_match, strict-match filter |
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megafox.config import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    name: str  # an lm_eval task / group / tag name, or a task YAML file
    shots: Optional[int] = None  # None: the task's own default
    metric: Optional[str] = None  # None: chosen from what the task reports (see runner.primary_metric)
    filter: str = "none"  # lm_eval's filter name the metric is read under (gsm8k: strict-match)
    label: Optional[str] = None  # the row name in tables
    subject_mean: bool = False  # a group scored as the plain mean of its subtasks (leaderboard MMLU)

    @property
    def is_file(self) -> bool:
        return self.name.endswith((".yaml", ".yml"))

    @property
    def title(self) -> str:
        return self.label or self.name


FOX1_SUITE: List[TaskSpec] = [
    TaskSpec("arc_challenge", 25, "acc_norm", label="ARC-Challenge"),
    TaskSpec("hellaswag", 10, "acc_norm", label="HellaSwag"),
    TaskSpec("truthfulqa_mc2", 0, "acc", label="TruthfulQA (mc2)"),
    TaskSpec("mmlu", 5, "acc", label="MMLU", subject_mean=True),
    TaskSpec("winogrande", 5, "acc", label="Winogrande"),
    TaskSpec("gsm8k", 5, "exact_match", "strict-match", label="GSM8K"),
]

SUITES: Dict[str, List[TaskSpec]] = {"fox1": FOX1_SUITE}

# Published scores (percent) on this protocol, from the Fox-1 model cards; tasks not listed were
# not published in what could be read, and show as "-" (so no published average either).
PUBLISHED: Dict[str, Dict[str, float]] = {
    "Fox-1-1.6B": {"hellaswag": 62.82, "truthfulqa_mc2": 38.66, "winogrande": 60.62, "gsm8k": 36.39},
    "Fox-1-1.6B-Instruct-v0.1": {"gsm8k": 39.20},
}


def suite(name: str) -> List[TaskSpec]:
    try:
        return list(SUITES[name])
    except KeyError:
        raise ConfigError(f"--suite: unknown suite {name!r}; known: {', '.join(SUITES)}") from None


def parse_task(text: str, where: str = "--tasks") -> TaskSpec:
    """`name`, `name:shots` or `path/to/task.yaml[:shots]`; a suite task keeps the suite's metric."""
    text = text.strip()
    name, shots = text, None
    head, sep, tail = text.rpartition(":")
    if sep and head:
        if not tail.isdigit():
            raise ConfigError(f"{where}: {text!r}: the part after ':' must be a number of shots")
        name, shots = head, int(tail)
    if not name:
        raise ConfigError(f"{where}: empty task name in {text!r}")
    if name.endswith((".yaml", ".yml")):
        name = str(Path(name).expanduser().resolve())
    known = {s.name: s for s in FOX1_SUITE}
    if name in known:
        base = known[name]
        return TaskSpec(name, shots, base.metric, base.filter, base.label, base.subject_mean)
    return TaskSpec(name, shots)


def parse_task_list(items: Sequence[str], where: str = "--tasks") -> List[TaskSpec]:
    specs = [parse_task(item, where) for item in items if item.strip()]
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"{where}: task {spec.name!r} is listed twice")
        seen.add(spec.name)
    return specs
