"""Benchmark: a fox1-1.6b-sized random megafox checkpoint -> HF (bf16), wall time and peak RSS.

    .venv/bin/python bench/convert.py [--workdir /tmp/megafox_bench] [--naive] [--keep]

Creates the fp32 dist checkpoint once (cached in --workdir), then runs `megafox-to-hf` in a child
process and reads that child's own peak RSS from wait4(). --naive also times a load-everything
conversion (all tensors in memory, one safetensors save_file) for comparison.
Goal (the checkpoint-tools issue): <= 60 s and peak RSS <= 1.5 x model bytes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GOAL_SECONDS, GOAL_RSS_FACTOR = 60.0, 1.5


def make_checkpoint(root: Path) -> None:
    """Random fox1-1.6b weights (megatron-core's init) saved as a TP1/PP1 torch_dist checkpoint."""
    from checkpoints_tools.hf_compare import build_single
    from megafox.checkpoint.saver import save_checkpoint
    from megafox.config import fox1_1p6b
    from megafox.records import CheckpointRecord, SavedLayout

    model = fox1_1p6b()
    module = build_single(model)
    record = CheckpointRecord(iteration=1, kind="model-only", model=model, layout=SavedLayout(1, 1, 1, 1, 1),
                              source="bench: megatron-core's random init")
    save_checkpoint(root, 1, [module], record)


def naive_convert(ckpt_root: Path, out: Path) -> None:
    """What a simple converter does: every tensor in memory, then one save_file."""
    import torch
    from safetensors.torch import save_file

    from megafox.checkpoint.reader import DistCheckpoint, EMBEDDING, FINAL_NORM, LAYER_PREFIX
    from megafox.model.hf_mapping import megatron_layer_to_hf

    ckpt = DistCheckpoint(ckpt_root)
    model = ckpt.model
    everything = ckpt.read({k: None for k in ckpt.model_keys()})
    hf = {"model.embed_tokens.weight": everything[EMBEDDING][: model.vocab_size]}
    for i in range(model.num_layers):
        layer = {k[len(LAYER_PREFIX):]: v[i] for k, v in everything.items() if k.startswith(LAYER_PREFIX)}
        hf.update(megatron_layer_to_hf([layer], i, model, te_names=ckpt.te_names))
    hf["model.norm.weight"] = everything[FINAL_NORM]
    hf = {k: v.to(torch.bfloat16).contiguous() for k, v in hf.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})


def measure(cmd) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    # output to files, not pipes: wait4 (for the child's peak RSS) must not block on a full pipe
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{out[-2000:]}\n{err[-4000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/megafox_bench")
    p.add_argument("--naive", action="store_true", help="also time the load-everything conversion")
    p.add_argument("--keep", action="store_true", help="keep the HF outputs")
    p.add_argument("--_make", help=argparse.SUPPRESS)
    p.add_argument("--_naive", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._make:
        make_checkpoint(Path(a._make))
        return 0
    if a._naive:
        naive_convert(Path(a._naive[0]), Path(a._naive[1]))
        return 0

    work = Path(a.workdir)
    ckpt = work / "ckpt_fox1_1p6b"
    if not (ckpt / "latest").is_file():
        print(f"creating the random fox1-1.6b checkpoint in {ckpt} ...", flush=True)
        wall, rss = measure([sys.executable, __file__, "--_make", str(ckpt)])
        print(f"  created in {wall:.0f} s (peak RSS {rss / 1e9:.1f} GB)", flush=True)
    from megafox.checkpoint.reader import DistCheckpoint

    model_bytes = DistCheckpoint(ckpt).nbytes()
    rows = []
    runs = [("megafox-to-hf (streaming)", [sys.executable, "-m", "checkpoints_tools.to_hf", "--checkpoint", str(ckpt),
                                           "--output", str(work / "hf_stream"), "--dtype", "bf16", "--no-progress"])]
    if a.naive:
        runs.append(("naive load-everything", [sys.executable, __file__, "--_naive", str(ckpt), str(work / "hf_naive")]))
    for name, cmd in runs:
        cold = drop_page_cache()
        wall, rss = measure(cmd)
        rows.append((name, wall, rss, cold))
    print(f"\nfox1-1.6b checkpoint: {model_bytes / 1e9:.2f} GB fp32 ({model_bytes / 4 / 1e9:.3f} B params); "
          f"output bf16; {os.cpu_count()} CPU cores")
    print(f"| conversion | wall s | peak RSS GB | RSS / model bytes | page cache | goal (<= {GOAL_SECONDS:.0f} s, "
          f"<= {GOAL_RSS_FACTOR}x) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, wall, rss, cold in rows:
        ok = wall <= GOAL_SECONDS and rss <= GOAL_RSS_FACTOR * model_bytes
        print(f"| {name} | {wall:.1f} | {rss / 1e9:.2f} | {rss / model_bytes:.2f}x | {'dropped' if cold else 'warm'} | "
              f"{'met' if ok else 'missed'} |")
    if not a.keep:
        for d in ("hf_stream", "hf_naive"):
            shutil.rmtree(work / d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
