"""Check checkpoints offline: every file against the digests its save recorded, nothing unsafe.

    megafox-ckpt verify --checkpoint DIR [--iteration N|latest|all]

The checks a resume makes before it loads a checkpoint (megafox.checkpoint.integrity), done in one
process: the record reads; every file the save wrote is there with its size and CRC-32 (older
checkpoints without digests: every shard the `.metadata` index names is there and long enough);
the pickled files a resume unpickles first hold plain data only. One line per checkpoint.
Exit codes: 0 every checked checkpoint verifies, 1 at least one does not (named), 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from checkpoints_tools.common import parse_iteration, run_cli
from megafox.checkpoint.errors import CheckpointError
from megafox.checkpoint.integrity import check_usable
from megafox.checkpoint.layout import iteration_dirs
from megafox.records import read_checkpoint_record

EXIT_PROBLEMS = 1


def checkpoint_problem(directory: Path) -> Optional[str]:
    """None when the iteration directory verifies, else the first problem (naming the file)."""
    try:
        record = read_checkpoint_record(directory)
    except CheckpointError as exc:
        return str(exc)
    return check_usable(directory, record.files)


def _main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megafox-ckpt verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with 'latest') or an iter_N directory")
    p.add_argument("--iteration", default="latest", help="an iteration, 'latest' (default) or 'all'")
    a = p.parse_args(argv)
    bad = 0
    root = Path(a.checkpoint)
    # a missing root is named first, whatever --iteration says
    which = a.iteration if a.iteration == "all" or not root.is_dir() else parse_iteration(a.iteration)
    for directory in iteration_dirs(root, which):
        problem = checkpoint_problem(directory)
        if problem:
            bad += 1
            print(f"{directory.name}: NOT usable: {problem}", flush=True)
        else:
            files = sorted(p.name for p in directory.iterdir() if p.is_file())
            size = sum((directory / f).stat().st_size for f in files)
            print(f"{directory.name}: OK ({len(files)} files, {size / 1e6:.1f} MB verified)", flush=True)
    return EXIT_PROBLEMS if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
