"""Make a checkpoint loadable at another TP/PP layout.

    megafox-ckpt reshard --checkpoint DIR [--iteration N|latest] --tp T --pp P [--vpp V]
                         [--output DIR2] [--force] [--overwrite]

megatron-core's dist checkpoints store global tensors, so a different TP/PP is already a plain
load (the trainer's `load_model` reshards on the fly). The one layout-dependent thing is the
vocab padding (padded to a multiple of make_vocab_size_divisible_by x TP). When it already fits,
this says so and writes nothing; otherwise (or with --force) it writes a model-only copy to
--output, streamed layer by layer, padded for T and recording the new layout. Optimizer, RNG and
data state are not carried over (the trainer starts them fresh from a model-only checkpoint).
An --output that already holds a checkpoint is refused unless --overwrite; the copy is written to a
temporary sibling and moved in (then `latest`) only when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from checkpoints_tools.common import ToolError, parse_iteration, run_cli
from checkpoints_tools.from_hf import model_only_record, save_model_only
from checkpoints_tools.streams import groups_from_checkpoint
from checkpoints_tools.output_dir import StagedCheckpoint, refuse_checkpoint_output
from megafox.checkpoint.reader import EMBEDDING, DistCheckpoint
from megafox.config import ConfigError, ParallelConfig


def needs_rewrite(ckpt: DistCheckpoint, tp: int) -> bool:
    return ckpt.shape(EMBEDDING)[0] != ckpt.model.padded_vocab_size(tp)


def _main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megafox-ckpt reshard", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--iteration", default="latest")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--output", default=None, help="where to write the re-padded model-only checkpoint")
    p.add_argument("--force", action="store_true", help="write a copy even when a plain load would do")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --output that already holds a checkpoint (its `latest` then points here)")
    a = p.parse_args(argv)
    ckpt = DistCheckpoint(a.checkpoint, parse_iteration(a.iteration))
    ckpt.validate()
    parallel = ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                              virtual_pipeline_model_parallel_size=a.vpp)
    try:
        parallel.validate(ckpt.model)
    except ConfigError as exc:
        raise ToolError(f"--tp/--pp/--vpp: {exc}") from None
    rewrite = needs_rewrite(ckpt, a.tp)
    if not rewrite and not a.force:
        print(f"{ckpt.path}: loads at TP={a.tp} PP={a.pp} as it is (dist checkpoints store global tensors; "
              f"vocab padding {ckpt.shape(EMBEDDING)[0]} fits); nothing to write")
        return 0
    if not a.output:
        raise ToolError(f"--output: required (the embedding is padded to {ckpt.shape(EMBEDDING)[0]} rows, "
                        f"TP={a.tp} needs {ckpt.model.padded_vocab_size(a.tp)})" if rewrite else "--output: required with --force")
    output = Path(a.output)
    if output.resolve() == Path(a.checkpoint).resolve():
        raise ToolError("--output: must differ from --checkpoint")
    refuse_checkpoint_output(output, a.overwrite, "--overwrite",
                             f"write iteration {ckpt.iteration} there and point its latest at it")
    # progress for inspection only: a model-only checkpoint restarts optimizer and data
    record = model_only_record(ckpt.model, parallel, f"megafox:{ckpt.path}", ckpt.record.tokenizer, ckpt.progress)
    with StagedCheckpoint(output) as staged:
        save_model_only(staged.path, ckpt.iteration, ckpt.model, parallel, groups_from_checkpoint(ckpt), record)
        path = staged.publish(ckpt.iteration)
    print(f"wrote {path} (model only) for TP={a.tp} PP={a.pp}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
