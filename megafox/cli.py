"""`megafox` command: `megafox info --preset fox1-1.6b --seq-length 8192 --tp 1 --pp 1 --dp 64`,
`megafox eval ...`, `megafox report RUN_DIR`."""
from __future__ import annotations

import argparse
import sys

from megafox import report
from megafox.config import MODEL_PRESETS, ConfigError, ParallelConfig, model_preset, validate_seq_length
from megafox.data.provenance import format_blend
from megafox.eval import cli as eval_cli
from megafox.info import format_report
from megafox.runtime.cli import run_main


def _info(args: argparse.Namespace) -> int:
    model = model_preset(args.preset).validate()
    validate_seq_length(args.seq_length, model, "--seq-length")
    ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp).validate(model)
    if args.dp < 1:
        raise ConfigError(f"--dp: must be >= 1, got {args.dp}")
    print(format_report(model, args.seq_length, args.tp, args.pp, args.dp, args.micro_batch_size,
                        args.recompute, not args.no_fused_loss))
    if args.blend:
        for path in args.blend:
            print("\n" + format_blend(path))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megafox", description="megafox: Fox-1 pretraining on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters, FLOPs per token and per-GPU memory for a preset and layout")
    info.add_argument("--preset", default="fox1-1.6b", help=f"one of: {', '.join(MODEL_PRESETS)}")
    info.add_argument("--seq-length", type=int, default=2048)
    info.add_argument("--tp", type=int, default=1)
    info.add_argument("--pp", type=int, default=1)
    info.add_argument("--dp", type=int, default=1)
    info.add_argument("--micro-batch-size", type=int, default=1)
    info.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    info.add_argument("--no-fused-loss", action="store_true", help="estimate with full logits materialized")
    info.add_argument("--blend", action="append", default=[], metavar="BLEND_JSON",
                      help="also show a stage's data: documents, tokens and what dedup/decontamination removed")
    info.set_defaults(func=_info)
    evaluate = sub.add_parser("eval", help="lm-evaluation-harness on a checkpoint or HF directory (megafox.eval)")
    eval_cli.add_arguments(evaluate)
    evaluate.set_defaults(func=eval_cli.main)
    report_parser = sub.add_parser("report", help="plot a run's curves and summarize it from its metrics files (megafox.report)")
    report.add_arguments(report_parser)
    report_parser.set_defaults(func=report.main)
    args = parser.parse_args(argv)
    return run_main(args.func, args, errors=ConfigError, prefix="megafox: error: ", os_errors=False,
                    interrupted=None)


if __name__ == "__main__":
    sys.exit(main())
