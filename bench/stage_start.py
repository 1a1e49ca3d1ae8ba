"""How long a curriculum stage takes to start, as stage 1 grows: the documents-read record against
recomputing what earlier stages read, and stage 1's own index build (megafox issue 18).

    python bench/stage_start.py                                   # 1e8..1e11 stage-1 tokens (~1 h, ~10 GB disk)
    python bench/stage_start.py --sizes 1e8,1e9 --json out.json   # smaller

For each size N (stage-1 tokens, consumed to the end) it writes a synthetic corpus - real Megatron
.idx files (log-normal document lengths, mean ~1,000 tokens) over sparse .bin files, two datasets
"web" (N tokens) and "code" (N/4) - and times, each in a fresh process (peak RSS from wait4):

  build1      stage 1's first start: megatron builds its indices (= `python -m megafox.data.build_index`,
              ahead of training; without it rank 0 does this while the other ranks wait)
  start1      stage 1's start once built: what every rank does (memory-maps the cache)
  record      the documents-read record written once at stage 1's end (write_documents_read)
  start2      stage 2's first start from the record (builds stage 2's own, fixed-size indices)
  requeue2    stage 2's start again, as every requeue/rank pays it, from the record
  before      the same requeue with megafox's previous code (git history): rebuild stage 1, recompute
              its reads from the consumed samples (np.add.at, np.unique), np.union1d, np.setdiff1d;
              skipped above --before-max (too slow) and extrapolated

Stage 1: web 0.8 + code 0.2 at seq 2048, global batch 2048 (Fox-1's); stage 2: web 0.6 + code 0.4
at seq 4096 with a fixed 5e7-token budget, so that its own index stays the same size and what
grows is what stage 1 left behind.  Times are wall seconds of the measured call inside the child
(imports excluded), the fastest of --repeat runs for the steps that can be repeated; RSS is the
child's peak, imports included (`baseline` row).  Extrapolations to Fox-1 (stage 1 = 2e12 tokens,
3e12 in all) are printed linear from the largest size and with the growth exponent measured
between the two largest sizes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEQ1, SEQ2, GBS1, GBS2 = 2048, 4096, 2048, 1024
STAGE2_TOKENS = 50_000_000
MEAN_DOC = 1000
FOX_STAGE1, FOX_TOTAL = 2e12, 3e12
PG_TIMEOUT_S = 30 * 60
STEPS = ["baseline", "build1", "start1", "record", "start2", "requeue2", "before"]
REPEATED = ("start1", "record", "requeue2")  # no cold cache to reset between runs


# ----------------------------------------------------------------------------- synthetic data
def _tokenizer(root: Path) -> str:
    import sentencepiece as spm

    model = root / "tokenizer.model"
    if not model.exists():
        text = root / "tok.txt"
        words = [f"w{i}" for i in range(400)]
        rng = np.random.default_rng(0)
        text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000)))
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "tokenizer"), vocab_size=300,
                                       model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=3,
                                       num_threads=1, minloglevel=2)
    return str(model)


def write_synthetic(prefix: str, tokens: int, seed: int) -> int:
    """Megatron .idx for ~`tokens` tokens (uint16) over a sparse .bin; returns the document count."""
    if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".done"):
        return int(Path(prefix + ".done").read_text())
    rng = np.random.default_rng(seed)
    mu = math.log(MEAN_DOC) - 0.5  # log-normal, sigma 1: mean MEAN_DOC
    parts, total = [], 0
    while total < tokens:
        part = np.clip(rng.lognormal(mu, 1.0, 1 << 22), 32, 200_000).astype(np.int32)
        parts.append(part)
        total += int(part.sum(dtype=np.int64))
    lengths = np.concatenate(parts)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), tokens)) + 1]
    n = len(lengths)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", n, n + 1))
        f.write(lengths.tobytes())
        offset, step = 0, 1 << 24
        for a in range(0, n, step):
            block = lengths[a:a + step].astype(np.int64) * 2
            pointers = np.cumsum(block) - block + offset
            offset += int(block.sum())
            f.write(pointers.tobytes())
        for a in range(0, n + 1, step):
            f.write(np.arange(a, min(n + 1, a + step), dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)  # sparse: megatron only maps it here
    Path(prefix + ".done").write_text(str(n))
    return n


def prepare(root: Path, size: float) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(root.parent)
    docs = {name: write_synthetic(str(root / name), int(size * share), seed)
            for name, share, seed in (("web", 1.0, 1), ("code", 0.25, 2))}

    def blend(stage, weights, budget):
        path = root / stage / "blend.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"stage": stage, "tokenizer": tok, "token_budget": int(budget),
                                    "datasets": [{"prefix": str(root / n), "weight": w} for n, w in weights]}))
        return str(path)

    num_samples = math.ceil(size / SEQ1)
    return {"root": str(root), "docs": docs, "cache": str(root / "cache"),
            "s1": blend("stage1", [("web", 0.8), ("code", 0.2)], size),
            "s2": blend("stage2", [("web", 0.6), ("code", 0.4)], STAGE2_TOKENS),
            "consumed": num_samples // GBS1 * GBS1, "record": str(root / "stage1.documents")}


# ------------------------------------------------------------------------------- the measured calls
MOVED_SINCE = {"megafox.data.tokenizer": "megafox.formats.tokenizer"}  # module -> where it lives now


def _before_module(root: Path):
    """megafox/data/stage_data.py as it was before the documents-read record (from git history)."""
    import importlib.util

    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "megafox/data/documents_read.py"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = subprocess.run(["git", "show", f"{added[-1]}^:megafox/data/stage_data.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    for moved, home in MOVED_SINCE.items():  # its imports, at today's paths
        source = source.replace(f"from {moved} import", f"from {home} import")
    path = root / "stage_data_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("stage_data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def child(step: str, spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from megafox.data.documents_read import read_documents_read, write_documents_read
    from megafox.data.stage_data import StageData

    out = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if step == "baseline":
        pass
    elif step in ("build1", "start1"):
        sd = StageData(spec["s1"], SEQ1, GBS1, cache_dir=spec["cache"])
        next(iter(sd.micro_batches(0, 1, 0, GBS1)))
    elif step == "record":
        import shutil

        shutil.rmtree(spec["record"], ignore_errors=True)  # a repeat must not find the record written
        sd = StageData(spec["s1"], SEQ1, GBS1, cache_dir=spec["cache"])
        out["load_s"] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        rec = write_documents_read(sd, spec["consumed"], spec["record"])
        out["excluded"] = {os.path.basename(p): int(e.count) for p, e in rec.entries.items()}
    elif step in ("start2", "requeue2"):
        sd = StageData(spec["s2"], SEQ2, GBS2, cache_dir=spec["cache"],
                       excluded_documents=read_documents_read(spec["record"]))
        next(iter(sd.micro_batches(0, 1, 0, GBS2)))
    elif step == "before":
        module = _before_module(Path(spec["root"]))
        t0, c0 = time.perf_counter(), time.process_time()
        sd = module.StageData(spec["s2"], SEQ2, GBS2, cache_dir=spec["cache"],
                              previous_stages=[(spec["s1"], spec["consumed"], SEQ1)])
        next(iter(sd.micro_batches(0, 1, 0, GBS2)))
        out["excluded"] = {os.path.basename(p): int(len(v)) for p, v in sd.excluded_documents.items()}
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    out["anon_gb"] = _anonymous_gb()  # while the stage's data is still alive
    return out


def _anonymous_gb() -> float:
    """This process's private anonymous memory now. Peak RSS also counts the memory-mapped .idx and
    index-cache pages a rank touched, which every rank of a node shares through the page cache (and
    the kernel can drop); anonymous memory is what each rank holds on its own."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def measure(step: str, spec: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, __file__, "--child", step, "--spec", json.dumps(spec), "--result", result.name]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        if proc.returncode != 0:
            return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
        out = json.loads(Path(result.name).read_text())
    out["rss_gb"] = usage.ru_maxrss * 1024 / 1e9
    return out


# ------------------------------------------------------------------------------------- report
def _fit(xs, ys):
    """Growth exponent b of y = a x^b through the last two points (b = 1: linear)."""
    (x1, y1), (x2, y2) = (xs[-2], ys[-2]), (xs[-1], ys[-1])
    if min(y1, y2) <= 0 or x1 == x2:
        return None
    return math.log(y2 / y1) / math.log(x2 / x1)


def _extrapolate(xs, ys, x, b=None):
    b = _fit(xs, ys) if b is None else b
    if b is None:
        return None, None
    return ys[-1] * (x / xs[-1]) ** max(b, 0.0), b


def _cell(r):
    if r is None:
        return "skipped"
    if "error" in r:
        return "error"
    anon = f" ({r['anon_gb']:.2f} anon)" if "anon_gb" in r else ""
    return f"{r['seconds']:.2f} s ({r['cpu_seconds']:.2f}) / {r['rss_gb']:.2f} GB{anon}"


def report(rows: list, sizes: list) -> str:
    lines = ["| stage-1 tokens | documents | consumed samples | " + " | ".join(STEPS[1:]) + " |",
             "| --- " * (3 + len(STEPS) - 1) + "|"]
    for size, row in zip(sizes, rows):
        lines.append(f"| {size:.0e} | {row['documents']:,} | {row['consumed']:,} | "
                     + " | ".join(_cell(row.get(s)) for s in STEPS[1:]) + " |")
    base = rows[0].get("baseline") or {}
    base_rss = base.get("rss_gb", 0.0)
    base_anon = base.get("anon_gb", 0.0)
    lines.append(f"\nwall seconds (CPU seconds of the process) / peak RSS (private anonymous memory held at the "
                 f"end: the rest of RSS is memory-mapped files a node's ranks share); baseline (imports only): "
                 f"{base_rss:.2f} GB RSS, {base_anon:.2f} GB anonymous")
    for size, row in zip(sizes, rows):
        if row.get("record") and row.get("before") and "excluded" in row["before"]:
            same = row["record"].get("excluded") == row["before"]["excluded"]
            lines.append(f"{size:.0e}: documents excluded {row['record'].get('excluded')} - the previous code: "
                         f"{'the same' if same else 'DIFFERENT: ' + str(row['before']['excluded'])}")
    lines.append("\nextrapolated from the largest size: linear, and with the growth exponent b (y ~ N^b) measured "
                 "between the two largest sizes; CPU time (less disturbed by other load than wall time) and "
                 "peak RSS above the baseline:")
    fox_docs = FOX_STAGE1 * 1.25 / MEAN_DOC

    def extrapolate(step, label, to, axis="tokens"):
        pts = [(s if axis == "tokens" else r["documents"], r[step]) for s, r in zip(sizes, rows)
               if r.get(step) and "error" not in r[step]]
        if len(pts) < 2:
            lines.append(f"  {label}: not enough measured sizes")
            return None
        xs = [p[0] for p in pts]
        cpu = [p[1]["cpu_seconds"] for p in pts]
        rss = [max(p[1]["rss_gb"] - base_rss, 1e-3) for p in pts]
        t, b = _extrapolate(xs, cpu, to)
        m, bm = _extrapolate(xs, rss, to)
        if t is None or m is None:
            lines.append(f"  {label}: no growth to extrapolate")
            return None
        t1, _ = _extrapolate(xs, cpu, to, 1.0)
        m1, _ = _extrapolate(xs, rss, to, 1.0)
        wall, bw = _extrapolate(xs, [p[1]["seconds"] for p in pts], to)
        anon = [max(p[1].get("anon_gb", float("nan")) - base_anon, 1e-3) for p in pts]
        a1 = _extrapolate(xs, anon, to, 1.0)[0] if all(math.isfinite(v) for v in anon) else None
        lines.append(f"  {label}: linear {t1:,.0f} CPU s ({t1 / 60:,.1f} min), +{m1:,.1f} GB; measured growth "
                     f"{t:,.0f} s ({t / 60:,.1f} min), +{m:,.1f} GB (b = {b:.2f} time, {bm:.2f} RSS; "
                     f"from {xs[-1]:.0e} {axis}); wall time with its measured growth {wall:,.0f} s (b = {bw:.2f})"
                     + (f"; private anonymous memory, linear: +{a1:,.1f} GB" if a1 is not None else ""))
        return max(t, t1, wall)

    extrapolate("build1", f"stage-1 index build at Fox-1's stage 1 ({FOX_STAGE1:.0e} tokens)", FOX_STAGE1)
    t3 = extrapolate("build1", f"stage-1 index build over {FOX_TOTAL:.0e} tokens", FOX_TOTAL)
    if t3 is not None:
        lines.append(f"    -> up to {t3 / PG_TIMEOUT_S:.1f}x the 30-minute process-group timeout: built ahead "
                     f"(build_index), and otherwise the other ranks wait on rank 0's flag file, not in a collective")
    extrapolate("start1", f"stage-1 start once built, per rank, at {FOX_STAGE1:.0e} tokens", FOX_STAGE1)
    extrapolate("record", f"record write at Fox-1's stage-1 end ({FOX_STAGE1:.0e} tokens, once)", FOX_STAGE1)
    extrapolate("requeue2", f"stage-2 start from the record at Fox-1 (~{fox_docs:.1e} stage-1 documents)",
                fox_docs, axis="documents")
    extrapolate("before", f"stage-2 start, previous code, at Fox-1's stage 1 ({FOX_STAGE1:.0e} tokens)", FOX_STAGE1)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e8,1e9,1e10,1e11", help="stage-1 token counts, comma-separated")
    p.add_argument("--before-max", type=float, default=1e10, help="largest size to run the previous code at")
    p.add_argument("--workdir", default=None, help="keep corpora and caches here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of start1/record/requeue2; the fastest is kept (a shared machine is noisy)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        Path(a.result).write_text(json.dumps(child(a.child, json.loads(a.spec))))
        return 0
    sizes = [float(s) for s in a.sizes.split(",")]
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="stage_start_")
    work = Path(a.workdir or tmp.name)
    rows = []
    for size in sizes:
        root = work / f"n{size:.0e}"
        t0 = time.perf_counter()
        spec = prepare(root, size)
        print(f"[{size:.0e}] corpus: {spec['docs']} documents ({time.perf_counter() - t0:.0f} s)", flush=True)
        for cache in (Path(spec["cache"]), Path(spec["record"])):  # every size starts cold
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
        row = {"documents": sum(spec["docs"].values()), "consumed": spec["consumed"]}
        for step in STEPS:
            if step == "baseline" and rows:
                continue
            if step == "before" and size > a.before_max:
                row[step] = None
                continue
            runs = [measure(step, spec, a.timeout) for _ in range(a.repeat if step in REPEATED else 1)]
            ok = [r for r in runs if "error" not in r]
            row[step] = min(ok, key=lambda r: r["seconds"]) if ok else runs[0]
            print(f"[{size:.0e}] {step}: {_cell(row[step])} {row[step].get('error', '')}", flush=True)
        rows.append(row)
    table = report(rows, sizes)
    print("\n" + table)
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": sizes, "rows": rows, "table": table}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    failed = [s for r in rows for s in STEPS if r.get(s) and "error" in r[s]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
