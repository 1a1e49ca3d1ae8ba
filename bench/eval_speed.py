"""Benchmark: megafox's in-process lm_eval model vs lm_eval's `hf` model, same weights, same requests.

    .venv/bin/python bench/eval_speed.py [--preset fox1-demo] [--requests 64] [--context 384]
                                         [--generate 8] [--gen-toks 32] [--batch-size 16]

Times the two request types lm_eval sends, one process each, on this machine:
loglikelihood (multiple-choice tasks: context + short continuation) and generate_until (GSM8K:
greedy decoding to a stop string or `--gen-toks` tokens). megafox runs `MegafoxLM` over a
`megafox-from-hf` checkpoint (TP1/PP1), lm_eval runs `HFLM` over the `megafox-to-hf` export.
Both decode greedily with a KV cache (megafox: megatron-core's static cache, TP1/PP1). Also checks
that both sides give the same loglikelihoods and generations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tokenizer(out: Path, vocab: int) -> Path:
    import sentencepiece as spm

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [l for f in ("argparse.py", "textwrap.py", "difflib.py", "string.py", "typing.py")
             for l in (stdlib / f).read_text().split("\n") if l.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "sp"), model_type="bpe",
                                   vocab_size=vocab, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2, num_threads=1)
    return out / "sp.model"


def _requests(tokenizer: Path, n: int, context: int, seed: int = 0):
    """Real text windows as contexts; 4 continuations each, like a multiple-choice task."""
    import random

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "collections" / "__init__.py").read_text()
    ids = sp.encode(text)
    rng = random.Random(seed)
    contexts, continuations = [], []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - context - 40)
        contexts.append(sp.decode(ids[start:start + context]))
        continuations.append([" " + sp.decode(ids[start + context + k:start + context + k + rng.randint(2, 8)])
                              for k in range(4)])
    return contexts, continuations


def _prepare(work: Path, preset: str):
    import torch

    from megafox.config import model_preset
    from megafox.model.hf_mapping import hf_config_dict

    model = model_preset(preset)
    tok = _tokenizer(work, min(model.vocab_size, 8000))  # a 256K vocabulary needs more text than the stdlib
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in hf_config_dict(model, "float32").items() if k not in ("architectures", "model_type",
                                                                                     "torch_dtype")}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(str(work / "hf_init"), safe_serialization=True)
    (work / "hf_init" / "tokenizer.model").write_bytes(tok.read_bytes())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["checkpoints_tools.from_hf", "--hf", work / "hf_init", "--output", work / "ckpt", "--no-progress"],
                 ["checkpoints_tools.to_hf", "--checkpoint", work / "ckpt", "--output", work / "export",
                  "--dtype", "fp32", "--no-progress"]):
        subprocess.run([sys.executable, "-m", *map(str, args)], check=True, env=env, cwd=REPO, capture_output=True)
    return tok


def _instances(contexts, continuations, generate: int, gen_toks: int):
    from lm_eval.api.instance import Instance

    ll = [Instance("loglikelihood", {}, (c, x), i) for i, (c, xs) in enumerate(zip(contexts, continuations))
          for x in xs]
    gen = [Instance("generate_until", {}, (c, {"until": ["\n\n\n"], "max_gen_toks": gen_toks, "do_sample": False}), i)
           for i, c in enumerate(contexts[:generate])]
    for inst in ll + gen:
        inst.task_name = "bench"
    return ll, gen


def _now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_one(system: str, work: Path, args) -> dict:
    """One system, in this process: seconds per request type and the loglikelihoods."""
    import torch

    from megafox.eval.tasks import offline_environment

    offline_environment()
    contexts, continuations = _requests(work / "sp.model", args.requests, args.context)
    ll, gen = _instances(contexts, continuations, args.generate, args.gen_toks)
    if system == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(work / "export"), dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype],
                  batch_size=args.batch_size, device="cuda" if torch.cuda.is_available() else "cpu")
        closing = None
    else:
        from megafox.config import ParallelConfig
        from megafox.data.tokenizer import load_tokenizer
        from megafox.eval.checkpoint_model import load_checkpoint_model
        from megafox.eval.cli import single_process_rendezvous
        from megafox.eval.lm import MegafoxLM
        from megafox.eval.scorer import CollectiveScorer
        from megafox.parallel import destroy_distributed, init_distributed

        single_process_rendezvous()
        init_distributed(ParallelConfig(use_distributed_optimizer=False))
        loaded = load_checkpoint_model(work / "ckpt", "latest", ParallelConfig(use_distributed_optimizer=False),
                                       args.dtype)
        lm = MegafoxLM(CollectiveScorer(loaded.chunks, loaded.model.vocab_size, args.batch_size),
                       load_tokenizer(str(work / "sp.model")), loaded.model.max_position_embeddings, progress=False)
        closing = destroy_distributed
    start = _now()
    scores = lm.loglikelihood(ll, disable_tqdm=True)
    t_ll = _now() - start
    start = _now()
    texts = lm.generate_until(gen, disable_tqdm=True)
    t_gen = _now() - start
    if closing:
        closing()
    return {"system": system, "loglikelihood_s": t_ll, "generate_s": t_gen, "scores": [s[0] for s in scores],
            "generated_tokens": sum(len(t) for t in texts), "texts": texts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="fox1-demo")
    p.add_argument("--requests", type=int, default=64, help="multiple-choice questions (4 continuations each)")
    p.add_argument("--context", type=int, default=384, help="context tokens per request")
    p.add_argument("--generate", type=int, default=8, help="generation requests")
    p.add_argument("--gen-toks", type=int, default=32, help="tokens generated per request")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--workdir", help="keep the model here (default: a temporary directory)")
    p.add_argument("--_system", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._system:  # child process: one system
        print(json.dumps(run_one(args._system, Path(args.workdir), args)))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megafox_eval_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "export" / "config.json").is_file():
        print(f"preparing a random {args.preset} checkpoint and its HF export in {work}", flush=True)
        _prepare(work, args.preset)
    results = {}
    for system in ("megafox", "hf"):
        cmd = [sys.executable, __file__, "--workdir", str(work), "--_system", system,
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("workdir", "_system")]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        results[system] = json.loads(out.stdout.strip().splitlines()[-1])
    m, h = results["megafox"], results["hf"]
    diff = max(abs(a - b) for a, b in zip(m["scores"], h["scores"]))
    same_text = sum(a == b for a, b in zip(m["texts"], h["texts"]))
    print(f"\n{args.preset}, {args.requests} x 4 loglikelihood requests of ~{args.context} context tokens; "
          f"{args.generate} generations of up to {args.gen_toks} tokens; batch {args.batch_size}; {args.dtype}\n")
    print("| workload | megafox in-process (s) | lm_eval hf (s) | megafox / hf |")
    print("| --- | ---: | ---: | ---: |")
    for key, name in (("loglikelihood_s", "loglikelihood"), ("generate_s", "generate_until")):
        print(f"| {name} | {m[key]:.2f} | {h[key]:.2f} | {m[key] / h[key]:.2f}x |")
    print(f"\nmax |loglikelihood difference| = {diff:.2e}; identical generations: {same_text}/{len(m['texts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
