"""`megafox eval`: lm-evaluation-harness on a megafox checkpoint (in-process) or an HF directory.

    megafox eval --checkpoint CKPT_DIR [--iteration N] --suite fox1 --output results/
    megafox eval --checkpoint CKPT_DIR --tasks arc_challenge:25,gsm8k:5 --limit 200
    megafox eval --hf HF_DIR --suite fox1 --data-dir /data/lm_eval --output results/
    torchrun --nproc-per-node 8 -m megafox.cli eval --checkpoint CKPT --tp 2 --pp 2 --suite fox1 ...

Writes <output>/<label>.json (per task: metric, value, stderr, shots, documents, time; the model,
checkpoint iteration and lm_eval version) and <output>/<label>.md (the table beside the published
Fox-1 numbers); with --log-samples also <output>/<label>.samples/<task>.jsonl.
Exit status: 0 done, 2 bad input (one line naming the task / file / flag), 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from megafox.config import ConfigError, ParallelConfig
from megafox.eval.report import build_report, markdown, write_report, write_samples
from megafox.eval.runner import quiet_lm_eval, run_tasks, samples_records
from megafox.eval.suites import parse_task_list, suite
from megafox.eval.tasks import load_tasks, offline_environment, require_lm_eval, task_manager
from megafox.checkpoint.errors import CheckpointError
from megafox.runtime.cli import run_main
from megafox.runtime.dist import free_port, rank, world_size

EXIT_BAD_INPUT = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="megafox checkpoint directory (scored in-process, at --tp/--pp)")
    src.add_argument("--hf", help="Hugging Face model directory (scored by lm_eval's own `hf` model)")
    p.add_argument("--iteration", default="latest", help="checkpoint iteration (default: latest)")
    p.add_argument("--suite", help="a named task set: fox1 (the Fox-1 report's table)")
    p.add_argument("--tasks", help="comma-separated lm_eval tasks or task YAML files, each name[:shots]")
    p.add_argument("--output", default="eval_results", help="directory for the results JSON / markdown")
    p.add_argument("--data-dir", help="staged datasets: <DIR>/<HF dataset id>/ per task (docs/evaluation.md); "
                                      "default: the local HF datasets cache")
    p.add_argument("--include-path", action="append", default=[], help="extra directory of lm_eval task YAMLs")
    p.add_argument("--limit", type=int, help="at most this many documents per task (a quick look; not comparable)")
    p.add_argument("--gen-kwargs", help="generation settings for generate_until tasks, e.g. max_gen_toks=64 "
                                        "(lm_eval's --gen_kwargs; changes the protocol, so recorded in the results)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward, per model replica")
    p.add_argument("--max-length", type=int, help="longest input in tokens (default: the model's max positions)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size for --checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size for --checkpoint")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the checkpoint records)")
    p.add_argument("--log-samples", action="store_true", help="also write every document's inputs and outputs")
    p.add_argument("--allow-downloads", action="store_true",
                   help="let datasets reach the network (off by default: offline clusters are the norm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class EvalInputError(RuntimeError):
    """Bad input, already reported (or to be reported) as one line; exit status 2."""


def main(args: argparse.Namespace) -> int:
    if not args.allow_downloads:
        offline_environment()  # before datasets / lm_eval are imported: they read it at import time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|ShardedTensor).*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    return run_main(_run, args, errors=(ConfigError, CheckpointError, EvalInputError), prefix="megafox eval: error: ",
                    status=EXIT_BAD_INPUT, os_errors=False, interrupted=None, speak=lambda: rank() == 0)


def _run(args: argparse.Namespace) -> int:
    specs = (suite(args.suite) if args.suite else []) + parse_task_list((args.tasks or "").split(","))
    names = [s.name for s in specs]
    if not specs:
        raise ConfigError("name what to evaluate: --suite fox1 and/or --tasks name[:shots],...")
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks: repeats a task of --suite {args.suite}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    version = require_lm_eval()
    if args.hf:
        return _run_hf(args, specs, version)
    return _run_checkpoint(args, specs, version)


# ------------------------------------------------------------------------------------ --hf HF_DIR
def _run_hf(args, specs, version: str) -> int:
    import torch  # here: `megafox info` and `megafox report` import this module and never load torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--hf runs in one process (lm_eval's `hf` model); launch it without torchrun")
    hf_dir = Path(args.hf).expanduser()
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"--hf {hf_dir}: not a Hugging Face model directory (no config.json)")
    tm, tasks = _load_tasks(args, specs)
    from lm_eval.models.huggingface import HFLM

    dtype = {"auto": "bfloat16" if torch.cuda.is_available() else "float32", "bf16": "bfloat16",
             "fp32": "float32"}[args.dtype]
    lm = HFLM(pretrained=str(hf_dir), dtype=dtype, batch_size=args.batch_size, max_length=args.max_length,
              device="cuda" if torch.cuda.is_available() else "cpu")
    model = {"kind": "hf", "name": hf_dir.resolve().name, "path": str(hf_dir.resolve()), "iteration": None}
    settings = _settings(args, layout="1 process", dtype=dtype, max_length=lm.max_length)
    _evaluate_and_write(args, lm, tm, tasks, model, settings, version, label=hf_dir.resolve().name)
    return 0


# ------------------------------------------------------------------------------ --checkpoint CKPT
def _run_checkpoint(args, specs, version: str) -> int:
    # here: torch and megatron stay off `megafox info`'s path; eval.lm imports lm_eval, which reads
    # offline_environment() at import time
    from megafox.checkpoint.layout import read_metadata
    from megafox.eval.checkpoint_model import load_checkpoint_model, load_tokenizer_for, model_config
    from megafox.eval.lm import MegafoxLM
    from megafox.eval.scorer import CollectiveScorer, serve_while
    from megafox.parallel.process_groups import destroy_distributed, init_distributed

    iteration = args.iteration if args.iteration == "latest" else _int(args.iteration, "--iteration")
    meta = read_metadata(args.checkpoint, iteration)  # every rank: fails alike on a bad path
    model = model_config(meta)
    tokenizer = load_tokenizer_for(meta, args.tokenizer)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"--tokenizer {tokenizer.path}: {tokenizer.vocab_size} pieces but the model has "
                          f"{model.vocab_size} embeddings: not the model's tokenizer")
    max_length = args.max_length or model.max_position_embeddings
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              use_distributed_optimizer=False).validate(model)
    single_process_rendezvous()
    init_distributed(parallel)
    try:
        tm = tasks = None
        problem = None
        if rank() == 0:
            try:
                tm, tasks = _load_tasks(args, specs)
            except (ConfigError, EvalInputError) as exc:
                problem = str(exc)
        problem = _agree(problem)
        if problem is not None:
            raise EvalInputError(problem if rank() == 0 else "")
        loaded = load_checkpoint_model(args.checkpoint, meta["iteration"], parallel, args.dtype)
        scorer = CollectiveScorer(loaded.chunks, model.vocab_size, args.batch_size)
        world = world_size()
        dtype = "bf16" if loaded.bf16 else "fp32"
        layout = f"TP{parallel.tp} PP{parallel.pp} DP{scorer.replicas} ({world} process{'es' if world > 1 else ''})"

        def drive():
            lm = MegafoxLM(scorer, tokenizer, max_length, name=model.name, progress=not args.no_progress)
            run = meta.get("run_state") or {}
            described = {"kind": "checkpoint", "name": f"{model.name} ({Path(meta['path']).parent.name})",
                         "path": str(Path(meta["path"]).resolve()), "iteration": meta["iteration"],
                         "stage": meta.get("stage"), "consumed_tokens": run.get("consumed_tokens"),
                         "tokenizer": tokenizer.path}
            label = f"{Path(meta['path']).resolve().parent.name}-iter{int(meta['iteration']):07d}"
            settings = _settings(args, layout=layout, dtype=dtype, max_length=max_length)
            _evaluate_and_write(args, lm, tm, tasks, described, settings, version, label)

        serve_while(scorer, drive)
        return 0
    finally:
        destroy_distributed()


# ------------------------------------------------------------------------------------- shared
def _load_tasks(args, specs):
    quiet_lm_eval()
    _say("indexing lm_eval tasks")
    tm = task_manager(specs, args.include_path)
    tasks = load_tasks(tm, specs, args.data_dir, announce=_say)
    return tm, tasks


def _evaluate_and_write(args, lm, tm, tasks, model: Dict[str, Any], settings: Dict[str, Any], version: str,
                        label: str) -> None:
    out = Path(args.output).expanduser()
    json_path, md_path = out / f"{label}.json", out / f"{label}.md"
    results, raw_by_task = [], {}

    def on_result(result, raw):
        results.append(result)
        raw_by_task[result.task] = {k: raw.get(k) for k in ("configs", "versions", "n-samples", "n-shot",
                                                                "higher_is_better")}
        if args.log_samples:
            for task, records in samples_records(raw).items():
                write_samples(out / f"{label}.samples", task, records)
        # after every task, so an interrupted run keeps what it finished
        write_report(build_report(results, model, dict(settings, finished=False), args.suite, version, raw_by_task),
                     json_path, None)

    run_tasks(lm, tasks, tm, limit=args.limit, log_samples=args.log_samples, gen_kwargs=args.gen_kwargs,
              announce=_say, on_result=on_result, progress=not args.no_progress)
    report = build_report(results, model, settings, args.suite, version, raw_by_task)
    write_report(report, json_path, md_path)
    print(markdown(report), flush=True)
    _say(f"wrote {json_path} and {md_path}")


def _settings(args, layout: str, dtype: str, max_length: int) -> Dict[str, Any]:
    return {"limit": args.limit, "batch_size": args.batch_size, "max_length": max_length, "layout": layout,
            "dtype": dtype, "data_dir": args.data_dir, "suite": args.suite, "tasks": args.tasks,
            "gen_kwargs": args.gen_kwargs, "finished": True}


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected an integer or 'latest', got {text!r}") from None


def _say(message: str) -> None:
    if rank() == 0:
        print(f"megafox eval: {message}", flush=True)


def _agree(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict, on every rank (so all of them stop together on bad input)."""
    import torch

    box = [problem]
    if world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def single_process_rendezvous() -> None:
    """Outside torchrun: one rank on a free port (a fixed default port would collide with any
    other evaluation or training on the machine)."""
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
