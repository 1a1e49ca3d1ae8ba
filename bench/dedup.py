"""Benchmark the data plan's dedup + decontamination steps (data_prep/dedup.py) against tokenizing.

    python bench/dedup.py [--sizes 2000 4000 16000] [--workdir /tmp/megafox_bench_dedup]
                          [--datasketch-path DIR]   # a directory holding the datasketch package

Corpus: real text only: the CPython standard library's .py sources cut into documents of ~8
blank-line separated blocks (~1-2 KB), with 10% of the documents repeated (exact copies) and 5%
repeated with a word changed (near copies), as a crawl has them; written as 4 .jsonl files per size.
For each corpus size, each step runs alone in a fresh process with one worker, its documents/s
per core from the process's CPU seconds (user + system, less the start-up every step pays; the
machine is shared, so wall time is shown but not used) and its peak RSS its own: signatures, bucket
merge, clusters,
and the tokenizer pass of `data_prep.preprocess` on the same files (a SentencePiece BPE tokenizer
trained by data_prep on the corpus, vocab 8000).  Decontamination runs against a benchmark index
of 2,000 examples (40-word stdlib passages, some of which the corpus holds).  Prints a table per size, the growth between sizes,
an extrapolation to Fox-1's ~2.5e9 documents on a SLURM array, and our MinHash vs datasketch's
(when importable) on the same documents.
"""

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def stdlib_docs():
    docs, buf = [], []
    for p in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        if "site-packages" in p:
            continue
        try:
            text = open(p, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        for block in text.split("\n\n"):
            if block.strip():
                buf.append(block)
            if len(buf) == 8:
                docs.append("\n\n".join(buf))
                buf = []
    return docs


def write_corpus(workdir, n, docs):
    d = os.path.join(workdir, f"n{n}")
    files = [os.path.join(d, f"part{i}.jsonl") for i in range(4)]
    if os.path.exists(os.path.join(d, "done")):
        return d, files
    os.makedirs(d, exist_ok=True)
    rng = random.Random(n)
    base = int(n / 1.15)
    if base > len(docs):
        raise SystemExit(f"only {len(docs)} distinct documents on this machine; use sizes <= {int(len(docs) * 1.15)}")
    out = list(docs[:base])
    for _ in range(int(0.10 * base)):
        out.append(rng.choice(out[:base]))
    for _ in range(n - len(out)):
        w = rng.choice(out[:base]).split(" ")
        w[rng.randrange(len(w))] = "changed"
        out.append(" ".join(w))
    rng.shuffle(out)
    fs = [open(f, "w") for f in files]
    for i, t in enumerate(out):
        fs[i % 4].write(json.dumps({"text": t}) + "\n")
    for f in fs:
        f.close()
    open(os.path.join(d, "done"), "w").close()
    return d, files


def write_plan(d, files, tokenizer, data_dir, workers=1):
    task = os.path.join(d, "bench_task.yaml")
    p = os.path.join(d, "plan.yaml")
    with open(p, "w") as f:
        f.write(f"output_dir: {d}/out\ntokenizer: {{model: {tokenizer}}}\npreprocess: {{workers: {workers}}}\n"
                f"stages:\n  s1:\n    token_budget: 1000\n    sources:\n"
                f"      - {{name: docs, globs: {json.dumps(files)}, weight: 1}}\n"
                f"    dedup: {{threshold: 0.8}}\n"
                f"    decontaminate: {{data_dir: {data_dir}, tasks: [{task}]}}\n")
    return p


def stage_task(d, docs):
    """A task YAML in lm_eval's format whose test split is 2,000 real passages."""
    data = os.path.join(d, "eval_data")
    os.makedirs(os.path.join(data, "bench_mc"), exist_ok=True)
    rng = random.Random(0)
    rows = [{"q": " ".join(t.split()[:40]), "choices": ["a", "b"], "answer": 0} for t in rng.sample(docs[-4000:], 2000)]
    for split in ("train", "test"):
        with open(os.path.join(data, "bench_mc", f"{split}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    with open(os.path.join(d, "bench_task.yaml"), "w") as f:
        f.write("task: bench_mc\ndataset_path: bench_mc\noutput_type: multiple_choice\ntraining_split: train\n"
                "test_split: test\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
                "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return data


CHILD = r"""
import sys, time, json
sys.path.insert(0, {repo!r})
from data_prep.plan import load_plan
from data_prep.dedup import StageDedup
plan = load_plan({plan!r})
t0 = time.perf_counter()
sd = StageDedup(plan, "s1", quiet=True)
t_index = time.perf_counter() - t0
t0 = time.perf_counter()
if {step!r} == "signatures":
    sd.signatures(1)
elif {step!r} == "merge":
    sd.merge(1)
else:
    sd.cluster()
print(json.dumps({{"seconds": time.perf_counter() - t0, "setup": t_index}}))
"""


def measured(cmd):
    """Run cmd under /usr/bin/time -v when there, else plain: (stdout, wall s, peak RSS MB, CPU s).
    CPU seconds (user + system) are what documents/s per core is computed from: on a shared,
    loaded machine wall time measures the neighbours."""
    t0 = time.perf_counter()
    if os.path.exists("/usr/bin/time"):
        p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=REPO)
        rss = next((int(x.split(":")[1]) / 1024 for x in p.stderr.splitlines() if "Maximum resident" in x), float("nan"))
        cpu = sum(float(x.split(":")[1]) for x in p.stderr.splitlines()
                  if x.strip().startswith(("User time", "System time")))
    else:
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        rss = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
        cpu = float("nan")
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed:\n{p.stderr[-2000:]}")
    return p.stdout, time.perf_counter() - t0, rss, cpu


MERGE_CHILD = r"""
import sys, time, json, resource
sys.path.insert(0, {repo!r})
from data_prep.dedup import _merge_unit
t0 = time.process_time()
_merge_unit((("exact", 0, 0), {bits}, {files!r}, {out!r}))
print(json.dumps({{"cpu": time.process_time() - t0}}))
"""


def merge_scale(workdir, total, shards=64):
    """One exact-hash merge unit over `total` synthetic entries in `shards` sorted shard files, with
    the key space in 1 and in 4 partitions: time and peak memory of a unit."""
    import numpy as np

    d = os.path.join(workdir, f"merge{total}")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    per = total // shards
    for k in range(shards):
        prefix = os.path.join(d, f"shard-{k:05d}")
        files.append(prefix)
        if os.path.exists(prefix + ".exact.npy"):
            continue
        hi = rng.integers(0, 2 ** 63, per, dtype=np.uint64) * np.uint64(2)
        hi[: per // 10] = hi[per // 10: 2 * (per // 10)]  # 10% duplicates
        lo = hi ^ np.uint64(12345)
        gid = np.arange(k * per, (k + 1) * per, dtype=np.uint64)
        o = np.lexsort((gid, lo, hi))
        np.save(prefix + ".exact.npy", np.stack([hi[o], lo[o], gid[o]]))
    out = []
    for bits in (0, 2):
        res, wall, rss, cpu = measured([sys.executable, "-c", MERGE_CHILD.format(
            repo=REPO, bits=bits, files=files, out=os.path.join(d, f"unit{bits}.npy"))])
        out.append((bits, json.loads(res.strip().splitlines()[-1])["cpu"], rss))
    return out


CLUSTER_CHILD = r"""
import sys, time, json
import numpy as np
sys.path.insert(0, {repo!r})
from data_prep.dedup import components
rng = np.random.default_rng(0)
m = {pairs}
# duplicate pairs as the merge writes them: (first document of a bucket, another), clusters of ~3
nodes = rng.choice(np.uint64(1) << np.uint64(60), size=m + m // 2, replace=False).astype(np.uint64)
first = nodes[rng.integers(0, m // 2, m)]
edges = np.stack([first, nodes[m // 2:][:m]])
t0 = time.process_time()
n, r = components(edges)
print(json.dumps({{"cpu": time.process_time() - t0, "nodes": int(len(n))}}))
"""


def cluster_scale(pairs):
    res, wall, rss, cpu = measured([sys.executable, "-c", CLUSTER_CHILD.format(repo=REPO, pairs=pairs)])
    return json.loads(res.strip().splitlines()[-1]), rss


def minhash_compare(docs, ds_path):

    from data_prep.minhash import MinHasher, ngrams_many, word_hashes_many, words

    sample = docs[:2000]
    h = MinHasher(128)
    t0 = time.process_time()
    for i in range(0, len(sample), 100):  # as the signature step does: a chunk of documents at a time
        wh, counts = word_hashes_many([t.lower() for t in sample[i:i + 100]])
        g, d = ngrams_many(wh, counts, 5)
        h.signatures(g, d, len(counts))
    ours = len(sample) / (time.process_time() - t0)
    theirs = None
    if ds_path:
        sys.path.insert(0, ds_path)
    try:
        from datasketch import MinHash
    except ImportError:
        return ours, None
    t0 = time.process_time()
    for t in sample:
        w = words(t)
        sh = {" ".join(w[i:i + 5]).encode() for i in range(max(len(w) - 4, 1))}
        m = MinHash(num_perm=128)
        m.update_batch(list(sh))
    theirs = len(sample) / (time.process_time() - t0)
    return ours, theirs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 16000])
    ap.add_argument("--workdir", default="/tmp/megafox_bench_dedup")
    ap.add_argument("--datasketch-path", default=None)
    ap.add_argument("--merge-entries", type=int, default=16_000_000,
                    help="synthetic entries for the merge-unit measurement (0: skip)")
    ap.add_argument("--cluster-pairs", type=int, default=8_000_000,
                    help="synthetic duplicate pairs for the cluster-step measurement (0: skip)")
    ap.add_argument("--only-merge", action="store_true", help="only the merge-unit and cluster measurements")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    docs = stdlib_docs()
    print(f"{len(docs):,} distinct stdlib documents available; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    tok_dir = os.path.join(a.workdir, "tok")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        d, files = write_corpus(a.workdir, a.sizes[0], docs)
        from data_prep.train_tokenizer import train

        train(files, 8000, tok_dir, quiet=True)
    tokenizer = os.path.join(tok_dir, "tokenizer.model")
    data_dir = stage_task(a.workdir, docs)
    rows = []
    for n in ([] if a.only_merge else a.sizes):
        d, files = write_corpus(a.workdir, n, docs)
        import shutil

        shutil.rmtree(os.path.join(d, "out"), ignore_errors=True)
        shutil.copy(os.path.join(a.workdir, "bench_task.yaml"), os.path.join(d, "bench_task.yaml"))
        plan = write_plan(d, files, tokenizer, data_dir)
        # the benchmark index (lm_eval loads the task) is built once, outside the timed steps
        _, _, _, base_cpu = measured([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); "
                                      f"from data_prep.plan import load_plan; from data_prep.dedup import StageDedup; "
                                      f"StageDedup(load_plan({plan!r}), 's1', quiet=True)"])
        # ^ also builds the benchmark index once; a second run measures the start-up every step pays
        _, _, _, base_cpu = measured([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); "
                                      f"from data_prep.plan import load_plan; from data_prep.dedup import StageDedup; "
                                      f"StageDedup(load_plan({plan!r}), 's1', quiet=True)"])
        r = {"n": n}
        for step in ("signatures", "merge", "cluster"):
            out, wall, rss, cpu = measured([sys.executable, "-c", CHILD.format(repo=REPO, plan=plan, step=step)])
            res = json.loads(out.strip().splitlines()[-1])
            r[step] = (max(cpu - base_cpu, 1e-3), rss, res["seconds"])
        _, _, _, tok_base = measured([sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
                                      "import data_prep.preprocess, sentencepiece" % REPO])
        out, wall, rss, cpu = measured([sys.executable, "-m", "data_prep.preprocess", "--input", *files, "--tokenizer",
                                        tokenizer, "--output-prefix", os.path.join(d, "tok_only"), "--workers", "1",
                                        "--progress", "none", "--quiet"])
        man = json.load(open(os.path.join(d, "tok_only.manifest.json")))
        r["tokenize"] = (max(cpu - tok_base, 1e-3), rss, man["elapsed_s"])
        rep = json.load(open(os.path.join(d, "out", "s1", "dedup_report.json")))
        r["report"] = rep["sources"]["docs"]
        r["bench"] = rep["benchmarks"]
        rows.append(r)
        print(f"\n## {n:,} documents ({sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB JSONL): "
              f"{r['report']['exact_duplicate']:,} exact, {r['report']['near_duplicate']:,} near duplicates, "
              f"{r['report']['contaminated']:,} contaminated")
        print("| step (1 process, 1 worker) | CPU seconds | documents/s per core | wall s | peak RSS MB |")
        print("| --- | --- | --- | --- | --- |")
        for step in ("signatures", "merge", "cluster", "tokenize"):
            s, m, w = r[step]
            print(f"| {step} | {s:.2f} | {n / s:,.0f} | {w:.2f} | {m:.0f} |")
        print(f"(load average now {os.getloadavg()[0]:.1f})")
        extra = r["signatures"][0] + r["merge"][0] + r["cluster"][0]
        print(f"dedup + decontamination add {extra:.1f} CPU s to {r['tokenize'][0]:.1f} CPU s of tokenizing "
              f"(+{100 * extra / r['tokenize'][0]:.0f}%)", flush=True)
    if len(rows) > 1:
        a0, a1 = rows[0], rows[-1]
        f = a1["n"] / a0["n"]
        print(f"\n## growth {a0['n']:,} -> {a1['n']:,} documents ({f:.0f}x)")
        print("| step | CPU time ratio | peak RSS ratio |")
        print("| --- | --- | --- |")
        for step in ("signatures", "merge", "cluster", "tokenize"):
            print(f"| {step} | {a1[step][0] / a0[step][0]:.1f}x | {a1[step][1] / a0[step][1]:.2f}x |")
        big = rows[-1]
        N = 2.5e9
        sig_rate = big["n"] / big["signatures"][0]
        merge_rate = big["n"] / big["merge"][0]
        tok_rate = big["n"] / big["tokenize"][0]
        print(f"\n## extrapolation to Fox-1's ~{N:.1e} documents (per-core rates of the {big['n']:,}-document run)")
        print(f"signatures: {N / sig_rate / 3600:,.0f} core-hours "
              f"({N / sig_rate / 3600 / 2048:.1f} h on a 64-node x 32-core SLURM array); "
              f"merge: {N / merge_rate / 3600:,.0f} core-hours in (bands + 1) x P units of <= partition_docs entries "
              f"each; tokenizing: {N / tok_rate / 3600:,.0f} core-hours")
    if a.merge_entries:
        print(f"\n## one exact-hash merge unit, {a.merge_entries:,} synthetic entries in 64 shard files (10% duplicates)")
        print("| partitions of the key space | entries in the unit | CPU s | entries/s | peak RSS MB |")
        print("| --- | --- | --- | --- | --- |")
        for bits, cpu, rss in merge_scale(a.workdir, a.merge_entries):
            e = a.merge_entries >> bits
            print(f"| {1 << bits} | {e:,} | {cpu:.2f} | {e / cpu:,.0f} | {rss:.0f} |", flush=True)
    if a.cluster_pairs:
        print(f"\n## connected components of {a.cluster_pairs:,} synthetic duplicate pairs")
        print("| pairs | documents in pairs | CPU s | peak RSS MB | bytes per pair |")
        print("| --- | --- | --- | --- | --- |")
        for m in (a.cluster_pairs // 4, a.cluster_pairs):
            res, rss = cluster_scale(m)
            print(f"| {m:,} | {res['nodes']:,} | {res['cpu']:.2f} | {rss:.0f} | {rss * 2 ** 20 / m:.0f} |", flush=True)
    ours, theirs = minhash_compare(docs, a.datasketch_path)
    print("\n## MinHash signatures, 2,000 documents, 128 permutations, word 5-grams, 1 core")
    print(f"ours (numpy multiply-shift): {ours:,.0f} docs/s" +
          (f"; datasketch MinHash.update_batch: {theirs:,.0f} docs/s; ours / datasketch = {ours / theirs:.2f}x"
           if theirs else "; datasketch not importable (--datasketch-path)"))


if __name__ == "__main__":
    main()
