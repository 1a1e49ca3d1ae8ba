"""`EvalConfig`, the training config's `eval:` section (downstream scores while training runs),
lives in megafox.config with every other section; this module names it for the eval package.

    eval:
      interval: 1000              # steps between evaluations; 0 = off
      tasks: [arc_easy:0, hellaswag:0, piqa]   # lm_eval task names ("name:shots") or task YAML paths
      data_dir: /data/lm_eval     # staged datasets (see docs/evaluation.md); null = the HF datasets cache
      limit: 500                  # documents per task (null = all)
      batch_size: 16              # sequences per forward, per model replica

Multiple-choice / loglikelihood tasks are what this is for (OLMo-core's in-loop downstream
evaluators are the anchor); generation tasks work but cost a forward per generated token.
"""
from megafox.config import EvalConfig  # noqa: F401  (defined with the other config sections)
