"""Downstream scores while training runs (OLMo-core's in-loop downstream evaluators are the anchor).

Every `eval.interval` steps a few lm_eval tasks (small multiple-choice / loglikelihood ones are
the intent) run on the model being trained, in its own TP/PP/DP layout through the same
`CollectiveScorer` that `megafox eval` uses: no export, no second copy of the weights. Rank 0
drives lm_eval; the other ranks serve its forwards. Each task's score and the evaluation's wall
time go to `trainer.metrics.scalars` (log line, TensorBoard, metrics jsonl) as
`eval/<task>/<metric>` and `eval/time_s`.

It leaves the training trajectory bit-identical: every RNG state (Python, NumPy, torch, CUDA and
megatron-core's tracker) is saved before and restored after (lm_eval reseeds them all), the
chunks go back to the training mode they were in, no data iterator is touched, and the forwards
run without autograd. Task data is loaded once, at start, on rank 0; a missing dataset stops the
run there (exit 2, the task named) rather than at the first evaluation.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from megafox.checkpoint.state import get_rng_state, set_rng_state
from megafox.config import ConfigError, EvalConfig
from megafox.eval.runner import quiet_lm_eval, run_tasks
from megafox.eval.scorer import CollectiveScorer, serve_while
from megafox.eval.suites import parse_task_list
from megafox.eval.tasks import load_tasks, offline_environment, require_lm_eval, task_manager
from megafox.runtime.dist import rank, world_size
from megafox.training.callbacks.base import Callback
from megafox.parallel.parallelize import params_gathered
from megafox.training.timers import phase


class DownstreamEvalCallback(Callback):
    def __init__(self, config: EvalConfig):
        self.config = config.validate()
        parse_task_list(self.config.tasks, where="eval.tasks")  # syntax, at start-up; names and data in on_start
        self.scorer = None
        self.tm = None
        self.tasks: List[Any] = []

    # ---------------------------------------------------------------------------------- set-up
    def on_start(self, trainer) -> None:
        if not self.config.interval:
            return
        problem = None
        if rank() == 0:
            try:
                self.tm, self.tasks = self._load_tasks(trainer)
            except ConfigError as exc:
                problem = str(exc)
        problem = _broadcast(problem)
        if problem is not None:
            raise ConfigError(f"eval: {problem}")
        self.scorer = CollectiveScorer(trainer.model, trainer.config.model.vocab_size, self.config.batch_size)

    def _load_tasks(self, trainer):
        offline_environment()
        require_lm_eval()
        quiet_lm_eval()
        specs = parse_task_list(self.config.tasks, where="eval.tasks")
        tm = task_manager(specs)
        tasks = load_tasks(tm, specs, self.config.data_dir)
        trainer.log(f"downstream eval: {', '.join(t.name for t in tasks)} every {self.config.interval} steps "
                    f"(limit {self.config.limit or 'none'} documents per task)")
        return tm, tasks

    # -------------------------------------------------------------------------------- each step
    def post_step(self, trainer, result) -> None:
        if self.config.interval and trainer.state.iteration % self.config.interval == 0:
            with phase(trainer, "eval", watch="eval"):
                self.evaluate(trainer)

    def evaluate(self, trainer) -> Optional[Dict[str, float]]:
        """Scores on rank 0 (None elsewhere); every rank must call it at the same step."""
        start = time.monotonic()
        rng = get_rng_state()
        modes = [chunk.training for chunk in trainer.model]
        for chunk in trainer.model:
            chunk.eval()
        try:
            # with overlap_param_gather the other ranks' updated shards arrive in the next forward's
            # hooks; gathered here, the evaluation sees this step's weights and DP replicas can run
            # different numbers of forwards
            with params_gathered(trainer.model), torch.no_grad():
                values = serve_while(self.scorer, lambda: self._drive(trainer))
        finally:
            for chunk, mode in zip(trainer.model, modes):
                chunk.train(mode)
            set_rng_state(rng)
        seconds = time.monotonic() - start
        if values is not None:
            values["eval/time_s"] = round(seconds, 3)
            trainer.metrics.scalars(trainer.state.iteration, trainer.state.consumed_tokens, values)
        reset = getattr(trainer.metrics, "reset_window", None)
        if reset is not None:
            reset()  # the evaluation's time is not training throughput
        return values

    def _drive(self, trainer) -> Dict[str, float]:
        from megafox.eval.lm import MegafoxLM  # imports lm_eval: only after offline_environment() (on_start)

        max_length = self.config.max_length or trainer.config.model.max_position_embeddings
        lm = MegafoxLM(self.scorer, trainer.tokenizer, max_length, name=f"step {trainer.state.iteration}",
                       progress=False)
        results = run_tasks(lm, self.tasks, self.tm, limit=self.config.limit, bootstrap_iters=0,
                            announce=lambda message: None, progress=False)
        return {f"eval/{r.task}/{r.metric}" + ("" if r.filter == "none" else f"_{r.filter}"): r.value
                for r in results if r.value is not None}


def _broadcast(value):
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
