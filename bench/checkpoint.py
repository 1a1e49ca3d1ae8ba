"""Checkpoint save/resume cost per rank as the model and data parallelism grow (megafox issue 18).

    python bench/checkpoint.py                                # 25M/100M/200M x DP 1/2/4 (~30 min on 2 cores)
    python bench/checkpoint.py --sizes 25M --dp 1,2 --json out.json

For each model size (Fox-shaped: GQA, tied embeddings, 32K vocabulary, fp32 on CPU ranks) and DP
size it starts DP CPU ranks (torchrun, gloo), builds the training stack (megafox.training.stack:
megatron-core DDP + distributed optimizer), trains 2 steps, and then measures, on every rank:

  save       for each format (megafox.config.CheckpointConfig.format): `gathered` (megatron-core's
             fully_reshardable save, megafox's format before issue 18) and `sharded` (each rank
             its own ranges): the peak extra host memory of the save (RSS sampled every 2 ms,
             above the RSS before the call, after malloc_trim), as a multiple of the rank's
             optimizer shard 12 x N / DP bytes (fp32 weights + 2 Adam moments); bytes written by
             the rank (its shard files; rank 0 also the index files); wall time of the save.
             `gathered` is skipped where its expected ~2.7 x 12N extra on every rank would not fit.
  async      the `sharded` save with checkpoint.async_save: how long the step loop stands still
             for it (the call: planning + copy to host), how much slower the steps are that run
             while the shards are written, and the peak extra memory above the peak of the same
             number of steps without a save.
  resume     load_training_checkpoint of each saved checkpoint on the same layout: bytes read by
             the rank (/proc/self/io rchar around the call, after one warm-up load) and wall time.
  layout     (the largest size at the largest DP) the `sharded` checkpoint loaded at DP/2 and at
             TP2 x DP/2: it loads at load time, no offline step; bytes read per rank and time.

The tables print the worst rank. The machine is shared and small: times are indicative, bytes and
memory ratios are the point. Results: bench/RESULTS_checkpoint.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # Fox-shaped: GQA, SwiGLU, tied embeddings; vocabulary 32K
    "25M": dict(num_layers=8, hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6, num_query_groups=2),
    "100M": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12, num_query_groups=4),
    "200M": dict(num_layers=16, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, num_query_groups=4),
}
VOCAB, SEQ, MICRO = 32000, 128, 1
GATHERED_EXTRA = 2.7  # x 12N per rank: what issue 18 measured for fully_reshardable
MiB = 2 ** 20


# ----------------------------------------------------------------------------- on every rank
class PeakRSS:
    """Samples this process's resident set every 2 ms on a thread; `peak` once stopped."""

    def __init__(self):
        self.peak, self._stop, self._page = 0, threading.Event(), os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self._now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())


def rss_settled() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def written_by(path: Path, rank: int) -> int:
    from megafox.checkpoint.integrity import files_of_rank

    return sum((path / name).stat().st_size for name in files_of_rank(path, rank))


def worker(spec: dict) -> None:
    import torch

    from megafox.checkpoint.loader import load_training_checkpoint
    from megafox.checkpoint.saver import CheckpointSaver, save_training_checkpoint
    from megafox.checkpoint.state import OPTIMIZER_METADATA, layout_signature, model_sharded_state_dict
    from megafox.config import BuildConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from megafox.info import parameter_count
    from megafox.parallel.process_groups import init_distributed
    from megafox.records import CheckpointRecord, RunState
    from megafox.training.stack import build_training_stack
    from megafox.parallel.parallelize import params_gathered
    from megafox.training.step import train_step
    from megatron.core import parallel_state as ps

    parallel = ParallelConfig(tensor_model_parallel_size=spec.get("tp", 1))
    init_distributed(parallel, 1234)
    rank, dp = torch.distributed.get_rank(), ps.get_data_parallel_world_size()
    model = ModelConfig(vocab_size=VOCAB, max_position_embeddings=1024, name=spec["size"], **SIZES[spec["size"]])
    n = parameter_count(model)
    stack = build_training_stack(model, parallel, BuildConfig(precision="fp32"), OptimizerConfig())
    g = torch.Generator().manual_seed(rank)

    def step() -> float:
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MICRO, SEQ)}
        t = time.monotonic()
        train_step(stack.model, stack.optimizer, iter([batch]), 1, SEQ, MICRO)
        return time.monotonic() - t

    def record(iteration):
        return CheckpointRecord(iteration=iteration, kind="train", model=model, layout=layout_signature(),
                                stage="s", stage_index=0, scheduler={"num_steps": 0},
                                run_state=RunState(iteration=iteration))

    out: Dict[str, dict] = {"params": n, "dp": dp, "rank": rank}
    root = Path(spec["root"])
    for _ in range(2):
        step()
    if spec.get("load_only"):
        for name, src in spec["load_only"].items():
            load_training_checkpoint(src, stack.model, stack.optimizer)  # warm-up (imports, page cache)
            r0, t0 = rchar(), time.monotonic()
            load_training_checkpoint(src, stack.model, stack.optimizer)
            out[f"load:{name}"] = {"read": rchar() - r0, "s": time.monotonic() - t0}
        _emit(spec, out)
        return
    for fmt in spec["formats"]:
        base = rss_settled()
        torch.distributed.barrier()
        with params_gathered(stack.model) if fmt == "gathered" else _Null(), PeakRSS() as rss:
            t0 = time.monotonic()
            path = save_training_checkpoint(root / fmt, 2, stack.model, stack.optimizer, record(2), format=fmt)
            seconds = time.monotonic() - t0
        out[f"save:{fmt}"] = {"extra": rss.peak - base, "written": written_by(path, rank), "s": seconds,
                              "total": sum(p.stat().st_size for p in path.iterdir() if p.is_file())}
        load_training_checkpoint(root / fmt, stack.model, stack.optimizer)  # warm-up
        r0, t0 = rchar(), time.monotonic()
        load_training_checkpoint(root / fmt, stack.model, stack.optimizer)
        out[f"load:{fmt}"] = {"read": rchar() - r0, "s": time.monotonic() - t0}
        if fmt == "gathered":  # what megafox read before: megatron-core's fully_reshardable load
            r0, t0 = rchar(), time.monotonic()
            read_as_megatron_core_does(root / fmt / "iter_0000002", stack)
            out["load:megatron-core"] = {"read": rchar() - r0, "s": time.monotonic() - t0}
    # asynchronous: the same number of plain steps first, for the step time and its peak RSS
    k = spec["overlap_steps"]
    rss_settled()
    with PeakRSS() as plain:
        plain_steps = [step() for _ in range(k)]
    saver = CheckpointSaver(async_save=True)
    rss_settled()
    with PeakRSS() as rss:
        t0 = time.monotonic()
        save_training_checkpoint(root / "async", 3, stack.model, stack.optimizer, record(3), saver=saver)
        stall = time.monotonic() - t0
        staged = saver.pending.staged
        overlapped, report = [], None
        while report is None:
            overlapped.append(step())
            report = saver.poll()
    step_s = sorted(plain_steps)[len(plain_steps) // 2]
    out["async"] = {"step_s": step_s, "stall": stall, "staged": staged, "overlapped": overlapped,
                    "slowdown": sum(max(0.0, s - step_s) for s in overlapped), "extra": rss.peak - plain.peak,
                    "total_s": report.total_s}
    _emit(spec, out)


def read_as_megatron_core_does(path: Path, stack) -> None:
    """The reads of megatron-core's own fully_reshardable load (each rank asks for the whole state
    of its TP/PP part; DCP reads every chunk of it). Only the reading: nothing is applied."""
    from megatron.core import dist_checkpointing

    from megafox.checkpoint.state import OPTIMIZER_METADATA, model_sharded_state_dict
    from megafox.compat.megatron_core import init_torch_adam_state, safe_checkpoint_loading

    state = model_sharded_state_dict(stack.model)
    init_torch_adam_state(stack.optimizer)
    state["optimizer"] = stack.optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    with safe_checkpoint_loading():
        dist_checkpointing.load(state, str(path))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _emit(spec, out):
    import torch

    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, out)
    if torch.distributed.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(gathered))
    torch.distributed.barrier()


# ----------------------------------------------------------------------------- driver
def launch(spec: dict, nproc: int, timeout: float) -> List[dict]:
    from megafox.runtime.dist import free_port

    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, result=str(Path(tmp) / "result.json"))
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker", str(spec_file)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['size']} DP{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(Path(spec["result"]).read_text())


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def run(sizes: List[str], dps: List[int], workdir: Path, timeout: float) -> dict:
    from megafox.config import ModelConfig
    from megafox.info import parameter_count

    results = {}
    for size in sizes:
        n = parameter_count(ModelConfig(vocab_size=VOCAB, **SIZES[size]))
        for dp in dps:
            # per rank: weights + grads (4 + 4 bytes) + the optimizer shard, and what gathered adds
            stack = dp * (8 * n + 12 * n / dp) * 1.3
            formats = ["sharded"]
            if stack + dp * GATHERED_EXTRA * 12 * n < 0.8 * available_bytes():
                formats.insert(0, "gathered")
            root = workdir / f"{size}-dp{dp}"
            print(f"{size} DP{dp}: {', '.join(formats)} ...", file=sys.stderr, flush=True)
            ranks = launch({"size": size, "root": str(root), "formats": formats, "overlap_steps": 3}, dp, timeout)
            results[f"{size}/{dp}"] = {"size": size, "dp": dp, "params": n, "ranks": ranks}
            if size == sizes[-1] and dp == dps[-1] and dp >= 2:
                layouts = {}
                for name, nproc, tp in ((f"DP{dp // 2}", dp // 2, 1), (f"TP2 x DP{dp // 2}", dp, 2)):
                    spec = {"size": size, "root": str(root), "tp": tp, "load_only": {"sharded": str(root / "sharded")}}
                    layouts[name] = launch(spec, nproc, timeout)
                results[f"{size}/{dp}"]["layouts"] = layouts
            shutil.rmtree(root, ignore_errors=True)
    return results


def tables(results: dict) -> str:
    lines = ["### Save (synchronous), worst rank",
             "| model | DP | format | extra host memory / (12N/DP) | written per rank (MiB, min-max) | "
             "largest rank's share | save s |", "|---|---|---|---|---|---|---|"]
    for r in results.values():
        shard = 12 * r["params"] / r["dp"]
        for fmt in ("gathered", "sharded"):
            saves = [x.get(f"save:{fmt}") for x in r["ranks"]]
            if saves[0] is None:
                lines.append(f"| {r['size']} | {r['dp']} | {fmt} | skipped (needs ~{GATHERED_EXTRA:.1f} x 12N per rank) | | | |")
                continue
            written = [s["written"] for s in saves]
            lines.append(f"| {r['size']} | {r['dp']} | {fmt} | {max(s['extra'] for s in saves) / shard:.2f} | "
                         f"{min(written) / MiB:.0f}-{max(written) / MiB:.0f} | "
                         f"{max(written) / sum(written):.2f} | {max(s['s'] for s in saves):.1f} |")
    lines += ["", "### Asynchronous save (`sharded`, checkpoint.async_save), worst rank",
              "| model | DP | step s | call (stall) s | of it copy to host s | slowdown of overlapped steps s "
              "| (stall + slowdown) / step | extra memory / (12N/DP) | save to commit s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        shard = 12 * r["params"] / r["dp"]
        a = [x["async"] for x in r["ranks"]]
        worst = max(a, key=lambda x: x["stall"] + x["slowdown"])
        lines.append(f"| {r['size']} | {r['dp']} | {worst['step_s']:.2f} | {worst['stall']:.2f} | {worst['staged']:.2f} | "
                     f"{worst['slowdown']:.2f} | {(worst['stall'] + worst['slowdown']) / worst['step_s']:.2f} | "
                     f"{max(x['extra'] for x in a) / shard:.2f} | {max(x['total_s'] for x in a):.1f} |")
    lines += ["", "### Resume on the same layout, worst rank",
              "| model | DP | checkpoint format | read per rank (MiB) | / checkpoint size | load s |",
              "|---|---|---|---|---|---|"]
    for r in results.values():
        for fmt, label in (("megatron-core", "gathered, read by megatron-core's loader (before)"),
                           ("gathered", "gathered"), ("sharded", "sharded")):
            loads = [x.get(f"load:{fmt}") for x in r["ranks"]]
            if loads[0] is None:
                continue
            total = r["ranks"][0][f"save:{'gathered' if fmt == 'megatron-core' else fmt}"]["total"]
            fmt = label
            read = max(x["read"] for x in loads)
            lines.append(f"| {r['size']} | {r['dp']} | {fmt} | {read / MiB:.0f} | {read / total:.2f} | "
                         f"{max(x['s'] for x in loads):.1f} |")
    for r in results.values():
        if "layouts" not in r:
            continue
        total = r["ranks"][0]["save:sharded"]["total"]
        lines += ["", f"### The {r['size']} `sharded` checkpoint saved at DP{r['dp']}, loaded at another layout "
                  "(at load time; no offline step)", "| loaded at | read per rank (MiB, max) | / checkpoint size | load s |",
                  "|---|---|---|---|"]
        for name, ranks in r["layouts"].items():
            loads = [x["load:sharded"] for x in ranks]
            read = max(x["read"] for x in loads)
            lines.append(f"| {name} | {read / MiB:.0f} | {read / total:.2f} | {max(x['s'] for x in loads):.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="25M,100M,200M")
    p.add_argument("--dp", default="1,2,4")
    p.add_argument("--json", default=None, help="also write the raw per-rank results here")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(json.loads(Path(a.worker).read_text()))
        return 0
    sizes, dps = a.sizes.split(","), [int(x) for x in a.dp.split(",")]
    for s in sizes:
        if s not in SIZES:
            p.error(f"--sizes: unknown size {s!r} (one of {', '.join(SIZES)})")
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        results = run(sizes, dps, Path(tmp), a.timeout)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
