"""Run under torchrun by tests/data/test_stage_data_multirank.py: every rank builds one StageData
over a fresh cache dir while the process group's timeout is shorter than rank 0's build.

    torchrun --nproc-per-node 2 tests/data/slow_build_ranks.py --mode slow|control|fail ...

slow:    rank 0's build is made to take --sleep-s longer (fault injection, here on the test side);
         each rank writes what it built to --out.rank<R>.json
control: the same timeout with a plain barrier while rank 0 sleeps: this one must fail
fail:    rank 0's build fails (seq_length beyond the data); each rank writes the error it got
"""
import argparse
import json
import sys
import time
from datetime import timedelta

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["slow", "control", "fail"], required=True)
    p.add_argument("--blend", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--timeout-s", type=float, default=3.0)
    p.add_argument("--sleep-s", type=float, default=7.0)
    a = p.parse_args()
    if a.mode != "control":
        from megafox.config import ConfigError
        from megafox.data import index_cache
        from megafox.data.stage_data import StageData

    # join with a generous timeout (the ranks' imports take uneven time on a loaded machine), then
    # shorten it for what is measured: every collective from here on
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.distributed.barrier()
    torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=a.timeout_s))
    rank = torch.distributed.get_rank()
    if a.mode == "control":
        if rank == 0:
            time.sleep(a.sleep_s)
        torch.distributed.barrier()
        return 0

    if rank == 0 and a.mode == "slow":
        build = index_cache.SafeCacheGPTDataset._build_document_sample_shuffle_indices

        def slow_build(self):
            time.sleep(a.sleep_s / 2)  # two datasets (the blend's prefixes): sleep_s in all
            return build(self)

        index_cache.SafeCacheGPTDataset._build_document_sample_shuffle_indices = slow_build
    t0 = time.monotonic()
    try:
        sd = StageData(a.blend, a.seq, 8, cache_dir=a.cache)
    except ConfigError as exc:
        result = {"error": str(exc)}
    else:
        tokens = torch.cat([sd.micro_batches(c, 8, 0, 1).__next__()["tokens"] for c in range(0, 32, 8)])
        result = {"tokens": tokens.tolist(), "seconds": time.monotonic() - t0}
    with open(f"{a.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
