"""`python -m megafox.data.build_index --config TRAIN.yaml --stage stage1`: build a stage's sample
indices ahead of training, in one process, without torch.distributed.

megatron-core builds a stage's document/sample/shuffle indices the first time the stage starts, on
rank 0.  At Fox-1's scale that takes half an hour or more and tens of GB (bench/stage_start.py),
on the training job's first node, while every other GPU idles.  Run this instead after `make
preprocess` (`make data-index CONFIG=...`, or the index step of launch/preprocess.slurm) on any
machine that sees the data and `checkpoint.dir` / `data.cache_dir`: it writes exactly the cache
files the trainer will look for (the same StageData, so the same keys), and the trainer's ranks
then only memory-map them.  Reruns find the cache and return in seconds.

A later stage's indices depend on which documents the earlier stages read, known once the
previous stage has completed (its record, `<checkpoint.dir>/<previous stage>.documents/`); build
those between the stages, or let the stage's first start build them.

Exit status: 0 built (or already there), 2 bad config or data (one `error:` line), 1 other failure.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megafox.config import ConfigError, TrainConfig, load_train_config


def cache_dir(config: TrainConfig) -> str:
    """megatron's index cache of a run: data.cache_dir, by default <checkpoint.dir>/data_cache."""
    return config.data.cache_dir or str(Path(config.checkpoint.dir) / "data_cache")


def stage_data_from_config(config: TrainConfig, stage_name: str, excluded_documents=None, previous_stages=()):
    """The StageData the trainer builds for `stage_name` (one definition for the trainer and this
    tool, so both find the same cache files)."""
    # megatron-core loads (with its import-time warnings) only once the config and stage check out:
    # a bad --config or --stage stays one line on stderr
    from megafox.data.stage_data import StageData

    stage = config.stage(stage_name)
    blend = config.blend_path(stage)
    if not blend.is_file():
        raise ConfigError(f"stages.{stage.name}.data: {blend} not found (run `make preprocess` or set data_dir)")
    return StageData(str(blend), stage.seq_length, stage.global_batch_size, seed=config.seed,
                     cache_dir=cache_dir(config), valid_fraction=config.validation.valid_fraction,
                     previous_stages=previous_stages, token_budget=stage.token_budget,
                     excluded_documents=excluded_documents)


def previous_record(config: TrainConfig, stage_name: str, required: bool = True):
    """The documents-read record of the stages before `stage_name` (named in the previous stage's
    .done), or None for the first stage. Without one: ConfigError when `required`, else None."""
    # late, as in stage_data_from_config: documents_read loads megatron-core
    from megafox.data.documents_read import record_before, record_dir

    index = config.stage_index(stage_name)
    record = record_before(config, index)
    if record is None and index > 0 and required:
        before = config.stages[index - 1].name
        raise ConfigError(f"--stage {stage_name}: its indices depend on the documents stage {before} read, "
                          f"recorded in {record_dir(config.checkpoint.dir, before)} when {before} completes; "
                          f"there is none yet")
    return record


def _cache_files(path: str) -> dict:
    try:
        return {e.name: e.stat().st_size for e in os.scandir(path) if e.is_file() and not e.name.startswith(".")}
    except FileNotFoundError:
        return {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megafox.data.build_index",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the training YAML the run will use")
    parser.add_argument("--stage", required=True, help="stage name from the config's `stages`")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="as for megafox-train (MEGAFOX_OVERRIDES is read too, as the trainer does)")
    args = parser.parse_args(argv)
    overrides = shlex.split(os.environ.get("MEGAFOX_OVERRIDES", "")) + list(args.override)
    try:
        config = load_train_config(args.config, overrides)
        stage = config.stage(args.stage)
        if getattr(stage, "kind", "pretrain") != "pretrain":
            print(f"stage {stage.name} is a {stage.kind} stage: it has no megatron sample index to build")
            return 0
        excluded = previous_record(config, stage.name)
        where = cache_dir(config)
        before = _cache_files(where)
        t0 = time.perf_counter()
        data = stage_data_from_config(config, stage.name, excluded_documents=excluded)
        seconds = time.perf_counter() - t0
    except ConfigError as exc:  # DataError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    after = _cache_files(where)
    new = {k: v for k, v in after.items() if before.get(k) != v}
    print(f"stage {stage.name}: {data.num_samples:,} training samples of {stage.seq_length} tokens "
          f"({data.num_valid_samples:,} validation) from {data.blend_path}")
    if new:
        size = sum(new.values())
        size = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
        print(f"built {len(new)} index files ({size}) in {where} in {seconds:.1f} s")
    else:
        print(f"already built: every index file was in {where} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
