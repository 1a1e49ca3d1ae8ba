"""What packing conversations costs and what it buys, at Fox-1-Instruct's scale.

Fox-1-Instruct was fine-tuned on ~5B tokens at 8K context: 1-5M conversations, depending on
their mean length. Three tables:

1. packing algorithms at seq_length 8192 on conversation lengths drawn from two log-normal
   distributions (mean ~1K and ~2.5K tokens, cut at 8192 as data_prep truncates them):
   efficiency (real tokens / (sequences x seq_length)) and time, for one row per conversation
   (no packing), a greedy fill in the shuffled order (next-fit), and megafox's best-fit decreasing
   (`megafox.data.packing.pack`) in windows of 1K / 8K conversations and over the whole epoch;
2. the epoch plan (`SFTData`: draw, shuffle, pack, shuffle the sequences) at a few sizes, timed
   through SFTData itself on real indexed files (token ids of random content), extrapolated
   linearly to 5B tokens, with the cache it writes and the loader's rows per second;
3. (`--kernels`) the native spec's packed attention kernels, forward + backward at Fox-1's head
   shapes (16 query / 4 KV heads of 128) over one 8K row of conversations: `segments` and `mask`,
   and `varlen` on a GPU.

    python bench/packing.py                 # ~1-2 minutes on a CPU
    python bench/packing.py --quick         # seconds (CI smoke)
    python bench/packing.py --kernels       # + attention kernels (on a GPU: bench/gpu_check.sh time)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafox.data.packing import pack  # noqa: E402

SEQ = 8192
TARGET_TOKENS = 5_000_000_000
DISTRIBUTIONS = {"mean~1K": (np.log(600), 1.0), "mean~2.5K": (np.log(1500), 1.0)}


def lengths_of(name: str, n: int, seed: int = 0) -> np.ndarray:
    mu, sigma = DISTRIBUTIONS[name]
    return np.clip(np.random.default_rng(seed).lognormal(mu, sigma, n), 16, SEQ).astype(np.int64)


def next_fit(lengths: np.ndarray, capacity: int) -> int:
    count, free = 0, 0
    for n in lengths.tolist():
        if n > free:
            count, free = count + 1, capacity
        free -= n
    return count


def algorithms(n: int) -> list:
    rows = []
    for dist in DISTRIBUTIONS:
        lengths = lengths_of(dist, n)
        tokens = int(lengths.sum())
        candidates = [("one row each", lambda: len(lengths)), ("greedy in order", lambda: next_fit(lengths, SEQ))]
        for window in (1024, 8192, n):
            label = "best-fit decr., whole epoch" if window == n else f"best-fit decr., window {window}"
            candidates.append((label, lambda w=window: pack(lengths, SEQ, w).num_sequences))
        for label, run in candidates:
            start = time.perf_counter()
            sequences = run()
            rows.append({"lengths": dist, "conversations": n, "algorithm": label, "sequences": sequences,
                         "efficiency": tokens / (sequences * SEQ), "seconds": time.perf_counter() - start})
    return rows


def _tokenizer(root: Path) -> str:
    import sentencepiece as spm

    text = root / "tok.txt"
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "tokenizer"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=3,
                                   num_threads=1, minloglevel=2)
    return str(root / "tokenizer.model")


def _write(prefix: Path, lengths: np.ndarray) -> None:
    """An SFT dataset: int32 token ids (as a 256K vocabulary needs) and uint8 masks. The .bin files
    are sparse (all zeros): the plan reads only the lengths, and bench/dataloader.py times reading
    real token files."""
    # megatron's own index writer, fed all lengths at once (its builder adds one document per call)
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    for path, dtype in ((str(prefix), np.int32), (str(prefix) + ".mask", np.uint8)):
        with open(path + ".bin", "wb") as f:
            f.truncate(int(lengths.sum()) * np.dtype(dtype).itemsize)
        with _IndexWriter(path + ".idx", dtype) as writer:
            writer.write(lengths.astype(np.int32).tolist(), None, list(range(len(lengths) + 1)))


def plans(sizes, dist: str, workdir: Path) -> list:
    from megafox.data.sft_data import SFTData

    tok = _tokenizer(workdir)
    rows = []
    for n in sizes:
        lengths = lengths_of(dist, n, seed=n)
        root = workdir / f"n{n}"
        root.mkdir()
        _write(root / "chat", lengths)
        blend = {"kind": "sft", "stage": "sft", "tokenizer": tok, "seq_length": SEQ,
                 "datasets": [{"prefix": str(root / "chat"), "mask_prefix": str(root / "chat.mask"), "weight": 1.0,
                               "documents": n}]}
        (root / "blend.json").write_text(json.dumps(blend))
        start = time.perf_counter()
        data = SFTData(str(root / "blend.json"), SEQ, 64, seed=1, epochs=1, valid_fraction=0.0,
                       cache_dir=str(root / "cache"))
        build = time.perf_counter() - start
        start = time.perf_counter()
        SFTData(str(root / "blend.json"), SEQ, 64, seed=1, epochs=1, valid_fraction=0.0, cache_dir=str(root / "cache"))
        reload = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in (root / "cache").glob("*.npy"))
        # the loader at DP 1, one row per micro-batch, page cache warm (the first pass is not
        # timed: cold, its rows are random reads of the disk, as GPTDataset's shuffled samples are)
        for _ in range(2):
            start, rows_read = time.perf_counter(), 0
            for consumed in range(0, min(data.num_samples, 512), 64):
                rows_read += sum(1 for _ in data.micro_batches(consumed, 1, 0, 1))
        loader = rows_read / (time.perf_counter() - start)
        rows.append({"conversations": n, "tokens": int(lengths.sum()), "sequences": data.num_real_samples,
                     "efficiency": data.packing_efficiency, "build_s": build, "reload_s": reload,
                     "cache_bytes": cache_bytes, "rows_per_s": loader})
    return rows


def kernels(tokens: int, repeats: int) -> list:
    import types

    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megafox.model.attention import SDPAttention, packed_seq_params

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lengths = np.minimum(lengths_of("mean~1K", 256, seed=3), tokens // 2)
    lengths = lengths[np.cumsum(lengths) <= tokens]
    lengths = np.append(lengths, tokens - lengths.sum())  # the row's padding segment
    lengths = lengths[lengths > 0]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    config = TransformerConfig(num_layers=1, hidden_size=2048, num_attention_heads=16, num_query_groups=4,
                               kv_channels=128, attention_dropout=0.0, use_cpu_initialization=True)
    tp1 = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    rows = []
    for kernel in (["segments", "mask"] + (["varlen"] if cuda else [])):
        attention = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp1, packed_kernel=kernel)
        q, k, v = (torch.randn(tokens, h, 128, device=device, dtype=dtype, requires_grad=True) for h in (16, 4, 4))
        times = []
        for i in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = attention(q, k, v, None, packed_seq_params=packed_seq_params(cu, int(lengths.max()), device))
            out.sum().backward()
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
        rows.append({"kernel": kernel, "device": device, "tokens": tokens, "segments": len(lengths),
                     "ms": 1000 * float(np.median(times))})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--kernels", action="store_true", help="also time the packed attention kernels")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    n_alg = 20_000 if args.quick else 500_000
    sizes = [2_000, 8_000] if args.quick else [100_000, 300_000, 1_000_000]

    results = {"algorithms": algorithms(n_alg)}
    print(f"\n1. packing {n_alg:,} conversations into rows of {SEQ}")
    print(f"{'lengths':<10} {'algorithm':<30} {'sequences':>10} {'efficiency':>10} {'seconds':>8}")
    for r in results["algorithms"]:
        print(f"{r['lengths']:<10} {r['algorithm']:<30} {r['sequences']:>10,} {100 * r['efficiency']:>9.2f}% "
              f"{r['seconds']:>8.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        results["plans"] = plans(sizes, "mean~1K", Path(tmp))
    print(f"\n2. SFTData epoch plan (lengths mean~1K, seq {SEQ}, window 8192), and the extrapolation to "
          f"{TARGET_TOKENS / 1e9:.0f}B tokens")
    print(f"{'conversations':>13} {'tokens':>13} {'sequences':>10} {'efficiency':>10} {'build s':>8} "
          f"{'reload s':>8} {'cache MB':>8} {'rows/s':>7}")
    for r in results["plans"]:
        print(f"{r['conversations']:>13,} {r['tokens']:>13,} {r['sequences']:>10,} {100 * r['efficiency']:>9.2f}% "
              f"{r['build_s']:>8.2f} {r['reload_s']:>8.2f} {r['cache_bytes'] / 1e6:>8.1f} {r['rows_per_s']:>7.0f}")
    big = results["plans"][-1]
    scale = TARGET_TOKENS / big["tokens"]
    results["extrapolated"] = {"conversations": int(big["conversations"] * scale), "build_s_per_epoch":
                               big["build_s"] * scale, "cache_mb_per_epoch": big["cache_bytes"] * scale / 1e6}
    e = results["extrapolated"]
    print(f"(rows/s: SFTData.micro_batches on one core, page cache warm; a GPU at Fox-1's goal of ~30K "
          f"tokens/s at 8K consumes ~4 rows/s)")
    print(f"{'-> 5B tokens':>13} {e['conversations']:>13,} conversations: ~{e['build_s_per_epoch']:.0f} s and "
          f"~{e['cache_mb_per_epoch']:.0f} MB of cache per epoch, once (rank 0; restarts memory-map it)")

    if args.kernels:
        import torch

        tokens = 8192 if torch.cuda.is_available() else (1024 if args.quick else 2048)
        results["kernels"] = kernels(tokens, 2 if args.quick or not torch.cuda.is_available() else 10)
        print(f"\n3. packed attention, forward + backward, 16/4 heads of 128, {tokens} tokens in "
              f"{results['kernels'][0]['segments']} segments")
        print(f"{'kernel':<10} {'device':<6} {'ms':>9}")
        for r in results["kernels"]:
            print(f"{r['kernel']:<10} {r['device']:<6} {r['ms']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
