"""Tokenize documents into Megatron's indexed format (PREFIX.bin + PREFIX.idx + PREFIX.manifest.json).

    python -m data_prep.preprocess --input GLOB [GLOB ...] --tokenizer MODEL --output-prefix PREFIX
        [--json-key text] [--workers N] [--append-eod | --no-append-eod] [--dtype auto|uint16|int32]
        [--format auto|jsonl|parquet|text] [--shards K] [--keep-shards]
        [--array-index I --array-count N]   # one deterministic slice of the shards (SLURM array task)
        [--merge]                           # merge finished shards into PREFIX (the finalize job)

Work is split into shards: one per input file by default, or K contiguous groups of files
(balanced by size) with --shards K; with K larger than the number of files, big plain .jsonl
files are cut into byte ranges at line boundaries, so even one huge file spreads over K array tasks.  Each shard is written under PREFIX.shards/ to temporary
names and renamed when complete; a rerun skips shards that are complete and whose inputs,
tokenizer and options are unchanged.  The final PREFIX.bin/.idx is the concatenation of the
shards in input order, so it is byte-identical whatever --workers, --shards or array split.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .common import FORMATS, cli_main, command_parser, expand_inputs
from .engine import RunOptions, add_engine_arguments, add_run_arguments, run_options
from .text_codec import TextRun


@dataclass(kw_only=True)
class Options(RunOptions):
    json_key: str = "text"
    append_eod: bool = True
    drop_filter: object = None  # data_prep.dedup.DropFilter: documents the stage's dedup removes


def preprocess(opts: Options, merge_only: bool = False) -> dict:
    """Run (a slice of) the preprocessing; returns the manifest (or the slice's stats)."""
    return TextRun(opts).run(merge_only)


# ---------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("data_prep.preprocess", __doc__)
    add_run_arguments(p, ".jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt files (globs allowed, repeatable)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the tokenizer's eos id to every document (default: on)")
    add_engine_arguments(p, FORMATS, "input format (auto: by file name; text: one document per file)")
    return p


def options_from_args(a) -> Options:
    kw = run_options(a)
    return Options(expand_inputs(a.input), a.tokenizer, a.output_prefix, json_key=a.json_key,
                   append_eod=a.append_eod, **kw)


@cli_main
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    preprocess(options_from_args(a), merge_only=a.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
