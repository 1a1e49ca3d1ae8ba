"""The training config's `eval:` section: downstream scores while training runs
(megafox.training.callbacks.downstream_eval runs them; megafox/eval/ scores them).

    eval:
      interval: 1000              # steps between evaluations; 0 = off
      tasks: [arc_easy:0, hellaswag:0, piqa]   # lm_eval task names ("name:shots") or task YAML paths
      data_dir: /data/lm_eval     # staged datasets (see docs/evaluation.md); null = the HF datasets cache
      limit: 500                  # documents per task (null = all)
      batch_size: 16              # sequences per forward, per model replica

Multiple-choice / loglikelihood tasks are what this is for (OLMo-core's in-loop downstream
evaluators are the anchor); generation tasks work but cost a forward per generated token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .loader import check_types, require


@dataclass
class EvalConfig:
    """Downstream scores while training runs (megafox.training.callbacks.downstream_eval)."""

    interval: int = 0  # steps between evaluations; 0 = off
    tasks: List[str] = field(default_factory=list)  # "name", "name:shots" or a task YAML path
    data_dir: Optional[str] = None  # root of the staged datasets; None = the HF datasets cache
    limit: Optional[int] = 500  # documents per task; None = the whole test split
    batch_size: int = 16  # sequences per forward pass, per model replica
    max_length: Optional[int] = None  # longest input in tokens; None = the model's max positions

    def validate(self) -> "EvalConfig":
        """Types and ranges; task names are parsed and their data checked at start-up, on rank 0."""
        check_types(self, "eval")
        require(self.interval >= 0, "eval.interval", f"must be >= 0 (0 = off), got {self.interval}")
        require(not self.interval or bool(self.tasks), "eval.tasks",
                "must name at least one task when eval.interval is set")
        require(self.limit is None or self.limit >= 1, "eval.limit",
                f"must be >= 1 (or null for all documents), got {self.limit}")
        require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.max_length is None or self.max_length >= 2, "eval.max_length",
                f"must be >= 2, got {self.max_length}")
        return self
