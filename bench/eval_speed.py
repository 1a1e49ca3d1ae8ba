"""Benchmark: megafox's in-process lm_eval model vs lm_eval's `hf` model, same weights, same requests.

    .venv/bin/python bench/eval_speed.py [--preset fox1-demo] [--requests 48] [--context 384]
                                         [--generate 16] [--gen-toks 32] [--documents 8]
                                         [--batch-size 16] [--repeat 3] [--tp 1|2]

Times the three request types lm_eval sends, with prompts of different lengths as real tasks have:
* loglikelihood (multiple-choice tasks): 4 continuations of 2-8 tokens after contexts of 64 to
  `--context` tokens of real code;
* generate_until (GSM8K): few-shot prompts of 1-8 worked examples (so their lengths vary like
  GSM8K's 5-shot prompts plus question), greedy decoding to "Question:" or `--gen-toks` tokens;
* loglikelihood_rolling (wikitext-style perplexity): whole documents of varied length, in
  max-length windows.
megafox runs `MegafoxLM` over a `megafox-from-hf` checkpoint (one process, or TP2 under torchrun
with `--tp 2`), lm_eval runs `HFLM` over the `megafox-to-hf` export; each system in its own
process, alternating, `--repeat` times; the table shows the medians and their ratio. Also checks
that both give the same loglikelihoods and generations.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = (("loglikelihood", "multiple choice (loglikelihood)"), ("generate_until", "GSM8K-like (generate_until)"),
         ("loglikelihood_rolling", "perplexity (loglikelihood_rolling)"))


def _tokenizer(out: Path, vocab: int) -> Path:
    import sentencepiece as spm

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [l for f in ("argparse.py", "textwrap.py", "difflib.py", "string.py", "typing.py")
             for l in (stdlib / f).read_text().split("\n") if l.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "sp"), model_type="bpe",
                                   vocab_size=vocab, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2, num_threads=1)
    return out / "sp.model"


def _stdlib(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text()


def _requests(tokenizer: Path, n: int, context: int, seed: int = 0):
    """Real code windows of 64..`context` tokens as contexts; 4 continuations each."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = sp.encode(_stdlib("collections/__init__.py"))
    rng = random.Random(seed)
    contexts, continuations = [], []
    for _ in range(n):
        length = rng.randint(min(64, context), context)
        start = rng.randrange(0, len(ids) - length - 40)
        contexts.append(sp.decode(ids[start:start + length]))
        continuations.append([" " + sp.decode(ids[start + length + k:start + length + k + rng.randint(2, 8)])
                              for k in range(4)])
    return contexts, continuations


def _gsm8k_prompts(n: int, seed: int = 0):
    """GSM8K's prompt shape: k worked "Question: ... Answer: ... #### N" examples, then a question."""
    rng = random.Random(seed)
    words = [w for w in _stdlib("textwrap.py").split() if w.isalpha()]

    def example():
        a, b = rng.randint(2, 90), rng.randint(2, 90)
        thing = " ".join(rng.sample(words, rng.randint(1, 12)))
        q = f"Question: A module has {a} functions about {thing} and another has {b}. How many in all?"
        return q, f"Answer: {a} + {b} = {a + b} functions.\n#### {a + b}"

    prompts = []
    for _ in range(n):
        shots = [" ".join(example()) for _ in range(rng.randint(1, 8))]
        prompts.append("\n\n".join(shots + [example()[0] + " Answer:"]))
    return prompts


def _documents(n: int, seed: int = 0):
    """Whole stdlib modules' text, cut to 2K-24K characters (~1-10 windows of 1024 tokens)."""
    rng = random.Random(seed)
    names = ["argparse.py", "textwrap.py", "difflib.py", "string.py", "typing.py", "inspect.py", "pydoc.py"]
    return [_stdlib(names[i % len(names)])[:rng.randint(2000, 24000)] for i in range(n)]


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


def _instances(args, work: Path):
    from lm_eval.api.instance import Instance

    contexts, continuations = _requests(work / "sp.model", args.requests, args.context)
    out = {
        "loglikelihood": [Instance("loglikelihood", {}, (c, x), i)
                          for i, (c, xs) in enumerate(zip(contexts, continuations)) for x in xs],
        "generate_until": [Instance("generate_until", {}, (p, {"until": ["Question:", "</s>", "<|im_end|>"],
                                                               "max_gen_toks": args.gen_toks, "do_sample": False}), i)
                           for i, p in enumerate(_gsm8k_prompts(args.generate))],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (d,), i)
                                  for i, d in enumerate(_documents(args.documents))],
    }
    for instances in out.values():
        for inst in instances:
            inst.task_name = "bench"
    return out


def _now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_one(system: str, work: Path, args) -> dict:
    """One system, in this process (rank 0 of `--tp` under torchrun for megafox): seconds per
    request type and what it computed."""
    import torch

    from megafox.eval.tasks import offline_environment

    offline_environment()
    requests = _instances(args, work)
    closing = None
    if system == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(work / "export"), dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype],
                  batch_size=args.batch_size, device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        from megafox.config import ParallelConfig
        from megafox.formats.tokenizer import load_tokenizer
        from megafox.eval.checkpoint_model import load_checkpoint_model
        from megafox.eval.cli import single_process_rendezvous
        from megafox.eval.lm import MegafoxLM
        from megafox.eval.scorer import CollectiveScorer
        from megafox.parallel.process_groups import destroy_distributed, init_distributed

        parallel = ParallelConfig(tensor_model_parallel_size=args.tp, use_distributed_optimizer=False)
        single_process_rendezvous()
        init_distributed(parallel)
        loaded = load_checkpoint_model(work / "ckpt", "latest", parallel, args.dtype)
        scorer = CollectiveScorer(loaded.chunks, loaded.model.vocab_size, args.batch_size)
        if not scorer.is_driver:
            scorer.serve()
            destroy_distributed()
            return {}
        lm = MegafoxLM(scorer, load_tokenizer(str(work / "sp.model")), loaded.model.max_position_embeddings,
                       progress=False)

        def closing():
            scorer.close()
            destroy_distributed()
    # first calls pay one-off costs (allocator, kernels' first dispatch) on both sides: not timed
    lm.generate_until(requests["generate_until"][:1], disable_tqdm=True)
    lm.loglikelihood(requests["loglikelihood"][:4], disable_tqdm=True)
    out = {"system": system}
    for kind, _ in KINDS:
        start = _now()
        answers = getattr(lm, kind)(requests[kind], disable_tqdm=True)
        out[f"{kind}_s"] = _now() - start
        out[kind] = [a[0] if isinstance(a, tuple) else a for a in answers]
    if closing:
        closing()
    return out


def _child(system: str, work: Path, args) -> dict:
    cmd = [__file__, "--workdir", str(work), "--_system", system,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("workdir", "_system")]]
    if system == "megafox" and args.tp > 1:
        from megafox.runtime.dist import free_port

        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(args.tp), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port())] + cmd
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(
        max(1, (os.cpu_count() or 1) // (args.tp if system == "megafox" else 1)))))
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="fox1-demo")
    p.add_argument("--requests", type=int, default=48, help="multiple-choice questions (4 continuations each)")
    p.add_argument("--context", type=int, default=384, help="longest multiple-choice context (tokens)")
    p.add_argument("--generate", type=int, default=16, help="GSM8K-like generation requests")
    p.add_argument("--gen-toks", type=int, default=32, help="most tokens generated per request")
    p.add_argument("--documents", type=int, default=8, help="perplexity documents")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="runs of each system (alternating); medians are shown")
    p.add_argument("--tp", type=int, default=1, choices=[1, 2], help="megafox's tensor parallelism")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--workdir", help="keep the model here (default: a temporary directory)")
    p.add_argument("--_system", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._system:  # child process: one system
        result = run_one(args._system, Path(args.workdir), args)
        if result:
            print(json.dumps(result))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megafox_eval_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "export" / "config.json").is_file():
        print(f"preparing a random {args.preset} checkpoint and its HF export in {work}", flush=True)
        _prepare(work, args.preset)
    runs = {"megafox": [], "hf": []}
    for _ in range(args.repeat):
        for system in runs:
            try:
                runs[system].append(_child(system, work, args))
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
    m, h = runs["megafox"][0], runs["hf"][0]
    print(f"\n{args.preset}, {args.dtype}, batch {args.batch_size}, megafox TP{args.tp}; medians of {args.repeat} "
          f"alternating runs per system\n")
    print("| workload | requests | megafox (s) | lm_eval hf (s) | megafox / hf |")
    print("| --- | ---: | ---: | ---: | ---: |")
    total_m = total_h = 0.0
    for kind, name in KINDS:
        tm = statistics.median(r[f"{kind}_s"] for r in runs["megafox"])
        th = statistics.median(r[f"{kind}_s"] for r in runs["hf"])
        total_m, total_h = total_m + tm, total_h + th
        print(f"| {name} | {len(m[kind])} | {tm:.2f} | {th:.2f} | {tm / th:.2f}x |")
    print(f"| all | | {total_m:.2f} | {total_h:.2f} | {total_m / total_h:.2f}x |")
    ll = max(abs(a - b) for a, b in zip(m["loglikelihood"], h["loglikelihood"]))
    rolling = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(m["loglikelihood_rolling"], h["loglikelihood_rolling"]))
    same = sum(a == b for a, b in zip(m["generate_until"], h["generate_until"]))
    print(f"\nmax |loglikelihood difference| = {ll:.2e}; max relative rolling difference = {rolling:.2e}; "
          f"identical generations: {same}/{len(m['generate_until'])}")
    print(f"in-loop evaluator cost per interval for these requests (megafox, TP{args.tp}): {total_m:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
