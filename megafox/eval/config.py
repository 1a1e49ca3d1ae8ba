"""`EvalConfig`: the training config's `eval:` section (downstream scores while training runs).

    eval:
      interval: 1000              # steps between evaluations; 0 = off
      tasks: [arc_easy:0, hellaswag:0, piqa]   # lm_eval task names ("name:shots") or task YAML paths
      data_dir: /data/lm_eval     # staged datasets (see README "Evaluation"); null = the HF datasets cache
      limit: 500                  # documents per task (null = all)
      batch_size: 16              # sequences per forward, per model replica

Multiple-choice / loglikelihood tasks are what this is for (OLMo-core's in-loop downstream
evaluators are the anchor); generation tasks work but cost a forward per generated token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megafox.config import ConfigError, check_types


@dataclass
class EvalConfig:
    interval: int = 0  # steps between evaluations; 0 = off
    tasks: List[str] = field(default_factory=list)  # "name", "name:shots" or a task YAML path
    data_dir: Optional[str] = None  # root of the staged datasets; None = the HF datasets cache
    limit: Optional[int] = 500  # documents per task; None = the whole test split
    batch_size: int = 16  # sequences per forward pass, per model replica
    max_length: Optional[int] = None  # longest input in tokens; None = the model's max positions

    def validate(self) -> "EvalConfig":
        check_types(self, "eval")
        if self.interval < 0:
            raise ConfigError(f"eval.interval: must be >= 0 (0 = off), got {self.interval}")
        if self.interval and not self.tasks:
            raise ConfigError("eval.tasks: must name at least one task when eval.interval is set")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit: must be >= 1 (or null for all documents), got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"eval.max_length: must be >= 2, got {self.max_length}")
        from megafox.eval.suites import parse_task_list

        parse_task_list(self.tasks, where="eval.tasks")  # syntax only; names are checked at start
        return self
