"""Is the data loader fast enough that a GPU loader (NVIDIA DALI) could not pay?

megafox's loader is megatron-core's GPTDataset/BlendedDataset over memory-mapped token ids: a
sample is an index lookup plus one or two slices of a .bin file, with nothing to decode. This
times it on one CPU core, in the trainer's own call (`StageData.micro_batches`, as the training
loop fetches a step's micro-batches before the step), for Fox-1's three sequence lengths, and sets
it against what one GPU consumes at the issue's speed goal (50% MFU of an H100 on Fox-1-1.6B).

    python bench/dataloader.py                      # ~1 minute, 2 x 24M tokens of synthetic data
    python bench/dataloader.py --tokens 2000000 --json out.json   # smaller

Synthetic documents (random ids, log-normal lengths around 1.5K tokens, int32 as a 256K vocabulary
needs) in two datasets blended 70/30, page cache warm (the second pass over the same samples
is not timed; what is timed is new samples).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafox.config import fox1_1p6b  # noqa: E402
from megafox.info import flops_per_token  # noqa: E402

H100_DENSE_BF16 = 989e12
GOAL_MFU = 0.5


def _tokenizer(root: Path) -> Path:
    import sentencepiece as spm

    text = root / "tok.txt"
    words = [f"w{i}" for i in range(400)]
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "tokenizer"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    return root / "tokenizer.model"


def _dataset(prefix: Path, tokens: int, seed: int) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    written = docs = 0
    while written < tokens:
        n = int(np.clip(rng.lognormal(np.log(1500), 1.0), 16, 65536))
        ids = rng.integers(3, 300, n, dtype=np.int32)
        ids[-1] = 2  # eos
        builder.add_document(torch.from_numpy(ids), [n])
        written += n
        docs += 1
    builder.finalize(str(prefix) + ".idx")
    return {"prefix": prefix.name, "documents": docs, "tokens": written}


def build_data(root: Path, tokens: int) -> Path:
    tok = _tokenizer(root)
    parts = [_dataset(root / name, tokens, seed) for seed, name in enumerate(("web", "code"))]
    blend = {"stage": "bench", "tokenizer": tok.name, "token_budget": 2 * tokens,
             "datasets": [dict(p, weight=w) for p, w in zip(parts, (0.7, 0.3))]}
    (root / "blend.json").write_text(json.dumps(blend))
    return root / "blend.json"


def measure(blend: Path, seq: int, steps: int, gbs_tokens: int, dp_size: int) -> dict:
    from megafox.data.stage_data import StageData

    gbs = max(dp_size, gbs_tokens // seq)
    t0 = time.perf_counter()
    data = StageData(str(blend), seq, gbs, cache_dir=str(blend.parent / "cache"), valid_fraction=0.0)
    build_s = time.perf_counter() - t0
    steps = min(steps, data.num_samples // gbs)
    fetched = 0
    t0 = time.perf_counter()
    for step in range(steps):
        for batch in data.micro_batches(step * gbs, 1, 0, dp_size):  # rank 0 of dp_size, mbs 1
            fetched += batch["tokens"].numel()
    dt = time.perf_counter() - t0
    loader = fetched / dt
    need = GOAL_MFU * H100_DENSE_BF16 / flops_per_token(fox1_1p6b(), seq)
    return {"seq": seq, "samples_per_rank": fetched // seq, "index_build_s": build_s,
            "loader_tokens_per_s": loader, "gpu_tokens_per_s_at_goal": need, "headroom": loader / need,
            "loader_share_of_step": need / loader}


def table(rows: list) -> str:
    out = [f"{'seq':>6} {'loader tok/s (1 core)':>22} {'GPU needs tok/s':>16} {'headroom':>9} "
           f"{'loader % of step':>17} {'index build s':>14}"]
    for r in rows:
        out.append(f"{r['seq']:>6} {r['loader_tokens_per_s']:>22,.0f} {r['gpu_tokens_per_s_at_goal']:>16,.0f} "
                   f"{r['headroom']:>8.0f}x {100 * r['loader_share_of_step']:>16.2f}% {r['index_build_s']:>14.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24_000_000, help="tokens per dataset (two datasets)")
    p.add_argument("--seqs", default="2048,4096,8192")
    p.add_argument("--steps", type=int, default=8, help="global batches timed per sequence length")
    p.add_argument("--batch-tokens", type=int, default=4 * 1024 * 1024, help="global batch, in tokens")
    p.add_argument("--dp", type=int, default=8, help="data-parallel size (rank 0's share is fetched)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        blend = build_data(Path(tmp), args.tokens)
        print(f"synthetic data: 2 x {args.tokens:,} tokens written in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = [measure(blend, int(s), args.steps, args.batch_tokens, args.dp) for s in args.seqs.split(",")]
    print(table(rows))
    print(f"GPU need: Fox-1-1.6B at {GOAL_MFU:.0%} MFU of {H100_DENSE_BF16 / 1e12:.0f} TFLOP/s; loader: rank 0 of "
          f"DP {args.dp}, micro-batch 1, {os.cpu_count()} CPUs on this machine, one used")
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "dataloader", "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
