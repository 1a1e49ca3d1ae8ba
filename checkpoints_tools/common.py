"""What every checkpoint tool shares: the one-line error contract and small CLI helpers."""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional

from megafox.checkpoint.errors import CheckpointError
from megafox.config import ConfigError, ParallelConfig
from megafox.runtime.cli import run_main
from megafox.runtime.dist import free_port

# Exit codes: 2 = bad input (not a checkpoint, missing shards, shape mismatch, unsupported model);
# 1 = the tool ran but --verify found the two models disagree.
EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1


class ToolError(RuntimeError):
    """Bad input for a checkpoint tool. The message names the file or field; no traceback."""


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run `main`, turning known input errors into one line on stderr and a non-zero exit."""
    # first: megatron-core warns at import time that TE/apex are absent, which is no news to a tool user
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_main(main, argv, errors=(ToolError, CheckpointError, ConfigError), status=EXIT_BAD_INPUT,
                    os_errors=False, interrupted="error: interrupted")


def parse_dtype(name: str):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ToolError(f"--dtype: must be bf16, fp16 or fp32, got {name!r}")
    return table[name]


def parse_iteration(text: str):
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise ToolError(f"--iteration: expected an integer or 'latest', got {text!r}") from None


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as HF uses them)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        unit, number = "B", t
    try:
        size = int(float(number) * units[unit])
    except ValueError:
        raise ToolError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MB)") from None
    if size <= 0:
        raise ToolError(f"--max-shard-size: must be > 0, got {text!r}")
    return size


def init_single_process():
    """One-rank megatron-core parallel state (gloo, CPU shim when there is no GPU), TP1/PP1."""
    from megafox.parallel.process_groups import init_distributed  # megatron-core: only for the commands that build a model

    if "RANK" not in os.environ:
        # A single process even inside a multi-task SLURM step (whose variables would
        # otherwise make init_distributed wait for peers that never come).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    init_distributed(ParallelConfig(use_distributed_optimizer=False))
