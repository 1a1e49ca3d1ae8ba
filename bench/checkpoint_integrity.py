"""What the per-file checksums of a checkpoint save cost (issue 17): megafox.checkpoint.integrity's
CRC-32 digest, measured on files of several sizes written here (read back from the page cache, as
after a save), and extrapolated to a Fox-1-1.6B training checkpoint, whose files each rank digests
for its own shard only (the sharded format writes ~1/DP of it per rank).

    python bench/checkpoint_integrity.py [--sizes-mb 64,256,512] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FOX1_PARAMS = 1_665_271_808
BYTES_PER_PARAM = 2 + 12  # bf16 weights + fp32 main weights and both Adam moments
BATCH_TOKENS = 4_194_304  # configs/train/fox1_1p6b.yaml
TOKENS_PER_S_PER_GPU = 40_000
INTERVAL = 1000  # checkpoint.interval in configs/train/fox1_1p6b.yaml


def main(argv=None) -> int:
    from megafox.checkpoint.integrity import digest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", default="64,256,512")
    p.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir)")
    a = p.parse_args(argv)
    rates = []
    print("| file | digest (page cache) | GB/s |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for mb in (int(x) for x in a.sizes_mb.split(",")):
            path = Path(tmp) / f"shard-{mb}.distcp"
            with open(path, "wb") as f:
                for _ in range(mb):
                    f.write(os.urandom(1 << 20))
            digest(path)  # warm: the file is in the page cache right after a save
            best = min(_timed(digest, path) for _ in range(3))
            rates.append(mb * (1 << 20) / best / 1e9)
            print(f"| {mb} MB | {best:.3f} s | {rates[-1]:.2f} |")
            path.unlink()
    rate = min(rates)
    total = FOX1_PARAMS * BYTES_PER_PARAM
    print(f"\nFox-1-1.6B training checkpoint: {total / 1e9:.1f} GB ({BYTES_PER_PARAM} bytes/parameter); "
          f"digest at the slowest rate measured ({rate:.2f} GB/s, one core):")
    print(f"| DP | bytes per rank | digest per rank | share of a {INTERVAL}-step save interval |")
    print("| --- | --- | --- | --- |")
    for dp in (8, 64, 512):
        per_rank = total / dp
        seconds = per_rank / 1e9 / rate
        step = BATCH_TOKENS / (dp * TOKENS_PER_S_PER_GPU)
        print(f"| {dp} | {per_rank / 1e9:.2f} GB | {seconds:.2f} s | {seconds / (INTERVAL * step):.3%} |")
    print(f"(a step of {BATCH_TOKENS:,} tokens at {TOKENS_PER_S_PER_GPU:,} tokens/s per GPU, the 50% MFU goal at 2K; "
          "with async saves the digest runs in the writer threads, off the step loop.)\n"
          "A resume verifies the same bytes, spread over all ranks the same way.")
    return 0


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
