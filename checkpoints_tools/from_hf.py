"""Turn a Hugging Face Llama directory (e.g. released Fox-1 weights) into a megafox checkpoint.

    megafox-from-hf --hf HF_DIR --output DIR --tp T --pp P [--vpp V] [--iteration 0]
                    [--verify [--tolerance 1e-3]] [--force] [--allow-nonfinite]

dist checkpoints store global tensors, so one process builds the model at TP1/PP1, streams the
weights in layer by layer and saves; the trainer then loads it at any layout. Only the vocab
padding depends on the TP size, so the embedding is padded for the requested --tp.
The result is model-only (`model_only: true` in megafox.json): no optimizer, RNG or data state.
Weights with NaN/Inf are refused (naming the tensor) unless --allow-nonfinite. An --output that
already holds a checkpoint is refused unless --force (which then points its `latest` at the new
iteration). The checkpoint is written to a temporary sibling and moved in only when complete
(and, with --verify, verified), `latest` last: a failure leaves the output as it was.
Exit codes: 0 ok, 2 bad input (one-line message), 1 --verify found a mismatch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from checkpoints_tools import hf_compare
from checkpoints_tools.common import EXIT_VERIFY_FAILED, ToolError, run_cli
from checkpoints_tools.output_dir import StagedCheckpoint, refuse_checkpoint_output
from checkpoints_tools.streams import HFWeights, fill_model, groups_from_hf
from megafox.checkpoint.saver import save_checkpoint
from megafox.config import ConfigError, ModelConfig, ParallelConfig
from megafox.records import CheckpointRecord, SavedLayout
from megafox.model.hf_mapping import model_config_from_hf


def read_hf_config(hf_dir: Path) -> ModelConfig:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ToolError(f"{hf_dir}: HF model directory not found")
    if not path.is_file():
        raise ToolError(f"{path}: not found (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise ToolError(f"{path}: invalid JSON ({exc})") from None
    try:
        return model_config_from_hf(cfg, name=Path(hf_dir).resolve().name)
    except (ValueError, KeyError, TypeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ToolError(f"{path}: not a Llama-compatible model: {detail}") from None


def model_only_record(model: ModelConfig, parallel: ParallelConfig, source: str,
                      tokenizer: Optional[Dict[str, Any]], progress: Optional[Dict[str, Any]] = None) -> CheckpointRecord:
    """The record of a checkpoint that holds weights only (the trainer starts its state fresh),
    padded for `parallel`'s TP (no data parallelism yet)."""
    return CheckpointRecord(iteration=0, kind="model-only", model=model,
                            layout=SavedLayout(tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp),
                            tokenizer=tokenizer, source=source, progress=progress or None)


def padded_for(model: ModelConfig, tp: int) -> ModelConfig:
    """Same model, built at TP1 with the embedding padding TP=`tp` expects."""
    return dataclasses.replace(model, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * tp)


def save_model_only(output: Path, iteration: int, model: ModelConfig, parallel: ParallelConfig, groups,
                    record: CheckpointRecord) -> Path:
    """Fill a TP1 model from `groups` and save it as checkpoint root `output` (a fresh directory:
    callers write into a StagedCheckpoint and publish it)."""
    module = hf_compare.build_single(padded_for(model, parallel.tp))
    fill_model(module, model, groups)
    path = save_checkpoint(output, iteration, [module], record)
    del module
    return path


def _args(argv):
    p = argparse.ArgumentParser(prog="megafox-from-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="HF directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="megafox checkpoint root to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the trainer will use (vocab padding)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the trainer will use (checked only)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (checked only)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number to save under (default 0)")
    p.add_argument("--verify", action="store_true", help="compare transformers' and megafox's logits afterwards")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit diff| for --verify (default 1e-3)")
    p.add_argument("--force", action="store_true",
                   help="write into an --output that already holds a checkpoint (its `latest` then points here)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights that contain NaN/Inf")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _main(argv: Optional[List[str]] = None) -> int:
    a = _args(argv)
    hf_dir = Path(a.hf)
    model = read_hf_config(hf_dir)
    parallel = ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                              virtual_pipeline_model_parallel_size=a.vpp)
    try:
        parallel.validate(model)
    except ConfigError as exc:
        raise ToolError(f"--tp/--pp/--vpp: {exc}") from None
    output = Path(a.output)
    refuse_checkpoint_output(output, a.force, "--force", f"write iteration {a.iteration} there and point its latest at it")
    weights = HFWeights(hf_dir)
    weights.check(model)
    tok = hf_dir / "tokenizer.model"
    record = model_only_record(model, parallel, f"hf:{hf_dir.resolve()}",
                               {"path": str(tok.resolve())} if tok.is_file() else None)
    groups = groups_from_hf(weights, model, allow_nonfinite=a.allow_nonfinite)
    if not a.no_progress:
        from tqdm import tqdm

        groups = tqdm(groups, total=model.num_layers + 2, desc="from_hf", unit="part", file=sys.stderr)
    with StagedCheckpoint(output) as staged:
        save_model_only(staged.path, a.iteration, model, parallel, groups, record)
        if a.verify and not hf_compare.hf_matches_checkpoint(hf_dir, str(staged.path), a.iteration, model,
                                                         padded_for(model, parallel.tp).padded_vocab_size(1), a.tolerance):
            print(f"not written: {output} left as it was", file=sys.stderr, flush=True)
            return EXIT_VERIFY_FAILED
        path = staged.publish(a.iteration)
    print(f"wrote {path} (model only, for TP={parallel.tp} PP={parallel.pp}; loads at any layout "
          f"with the same vocab padding)", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
