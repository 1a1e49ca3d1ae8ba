"""Training-step throughput of megafox vs HF transformers (eager) vs plain megatron-core (local
spec), in one run, plus a loss-only microbenchmark of the fused LM-head + cross-entropy.

    python bench/throughput.py                      # GPU: Fox-1-1.6B, seq 2K/4K/8K, mbs 1
    python bench/throughput.py --tiny               # CPU smoke: a tiny model, in-process
    python bench/throughput.py --loss-only [--tokens 8192 --vocab 256000 --hidden 2048]

Each (system, seq) is measured in its own process on GPU (clean peak-memory counters, no
allocator leftovers); `--in-process` (the default with --tiny) runs them in this process.
Prints one comparison table and writes JSON (--json). Model FLOPs per token follow
/work/shared/reference/anchors.md: 6 x (layer + LM-head params) + 12 x layers x seq x hidden.
MFU is against 989 TFLOP/s (H100 dense bf16).

Systems: megafox (native spec: SDPA attention, fused loss with precomputed LM-head grads; the
config options below), megafox_unfused (same, megatron-core's output layer + cross-entropy),
hf (transformers LlamaForCausalLM, SDPA, autocast bf16, fused AdamW), mcore (megatron-core
GPTModel, local spec, bf16, distributed optimizer; set up as /work/shared/tools/gpu_anchor.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megafox.info import flops_per_token  # noqa: E402  (the trainer's MFU uses the same count)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
PEAK_TFLOPS = 989.0
SYSTEMS = ("megafox", "megafox_unfused", "hf", "mcore")


def model_config(tiny: bool):
    from megafox.config import ModelConfig, fox1_1p6b

    if not tiny:
        return fox1_1p6b()
    return ModelConfig(name="bench-tiny", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=2, vocab_size=1000,
                       max_position_embeddings=1024)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t) / steps


def _batch(m, seq, mbs, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, m.vocab_size, (mbs, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous().to(DEV), "labels": tokens[:, 1:].contiguous().to(DEV),
            "loss_mask": torch.ones(mbs, seq, device=DEV)}


# ----------------------------------------------------------------------------------------------
# One training step per system; each returns a no-argument step function.

def _init_megatron():
    from megafox.config import ParallelConfig
    from megafox.parallel.process_groups import init_distributed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed(ParallelConfig(use_distributed_optimizer=True))


def megafox_step(m, seq, mbs, fused: bool, recompute: str, loss_grad: str, impl: str, chunk: int,
                 loss_kernel: str = "eager", compile_layers: bool = False):
    import megafox.training.step as step_mod
    from megafox.config import BuildConfig, ParallelConfig
    from megafox.training.stack import build_training_stack

    _init_megatron()
    m.transformer_impl = impl
    build = BuildConfig(precision="auto", recompute=recompute, fused_loss=fused, loss_chunk_tokens=chunk,
                        loss_grad=loss_grad, loss_kernel=loss_kernel, compile_layers=compile_layers)
    # the trainer's own stack (bf16 + Float16Module on a GPU, fp32 on the CPU)
    stack = build_training_stack(m, ParallelConfig(use_distributed_optimizer=True), build)
    ddp, optimizer = stack.model, stack.optimizer
    batch = _batch(m, seq, mbs)  # its loss_mask lets the fused loss compute LM-head grads in the forward

    def step():
        step_mod.train_step(ddp, optimizer, iter([batch]), 1, seq, mbs)
    return step


def hf_step(m, seq, mbs):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megafox.model.hf_mapping import hf_config_dict

    cfg = {k: v for k, v in hf_config_dict(m, None).items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg = LlamaConfig(**cfg)
    cfg._attn_implementation = "sdpa"
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    batch = _batch(m, seq, mbs)

    def step():
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(input_ids=batch["tokens"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def mcore_step(m, seq, mbs):
    """gpu_anchor.py's "mcore" bench: GPTModel, local spec, bf16 params, distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_megatron()
    cfg = TransformerConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                            num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size, gated_linear_unit=True,
                            activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
                            add_bias_linear=False, bf16=CUDA, params_dtype=torch.bfloat16 if CUDA else torch.float32,
                            hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                            apply_rope_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                            persist_layer_norm=False, bias_activation_fusion=CUDA, use_cpu_initialization=not CUDA)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=m.padded_vocab_size(), max_sequence_length=m.max_position_embeddings,
                     share_embeddings_and_output_weights=True, position_embedding_type="rope",
                     rotary_base=int(m.rope_theta))
    if CUDA:
        model.cuda()
    model = DDP(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=CUDA, use_distributed_optimizer=True,
                                                 clip_grad=1.0), [model])
    fb = get_forward_backward_func()
    batch = _batch(m, seq, mbs)
    pos = torch.arange(seq, device=DEV).unsqueeze(0).expand(mbs, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=DEV).tril().logical_not().view(1, 1, seq, seq)

    def fwd_step(it, mod):
        out = mod(batch["tokens"], pos, mask, labels=batch["labels"])
        return out, lambda o: (o.float().mean(), {})

    def step():
        model.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=fwd_step, data_iterator=iter([0]), model=model, num_microbatches=1,
           seq_length=seq, micro_batch_size=mbs, forward_only=False)
        opt.step()
    return step


def measure(system: str, seq: int, mbs: int, args) -> dict:
    m = model_config(args.tiny)
    res = dict(system=system, seq=seq, mbs=mbs, device=torch.cuda.get_device_name() if CUDA else "cpu")
    try:
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if system in ("megafox", "megafox_unfused"):
            step = megafox_step(m, seq, mbs, fused=system == "megafox", recompute=args.recompute,
                                loss_grad=args.loss_grad, impl=args.impl, chunk=args.loss_chunk_tokens,
                                loss_kernel=args.loss_kernel, compile_layers=args.compile_layers)
        elif system == "hf":
            step = hf_step(m, seq, mbs)
        elif system == "mcore":
            step = mcore_step(m, seq, mbs)
        else:
            raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
        dt = timed(step, args.warmup, args.steps)
        tps = mbs * seq / dt
        tflops = tps * flops_per_token(m, seq) / 1e12
        res.update(step_s=dt, tokens_per_s=tps, model_tflops=tflops, mfu=tflops / PEAK_TFLOPS,
                   peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if CUDA else None)
    except torch.OutOfMemoryError:
        res["error"] = "OOM"
    except Exception as e:  # one failing system must not hide the others' numbers
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


# ----------------------------------------------------------------------------------------------
# Loss-only microbenchmark: LM head + cross-entropy, fused vs megatron-core's unfused path.

def loss_only(variant: str, args) -> dict:
    from megatron.core import tensor_parallel

    from megafox.model.fused_loss import chunk_size, fused_linear_cross_entropy

    _init_megatron()
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator(device=DEV).manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = (torch.randn(n, h, generator=g, device=DEV) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=DEV) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=DEV)
    mask = torch.ones(n, device=DEV)
    # as under megatron-core DDP (grad_reduce_in_fp32): an fp32 main_grad on the weight, into which
    # its hook adds weight.grad after backward; the fused variants add into it directly
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=DEV)

    def step():
        if variant == "unfused":  # GPTModel: output_layer GEMM, then vocab-parallel CE on [s, b, v]
            logits = (hidden @ weight.t()).view(n, 1, v)
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.view(n, 1)).view(n)
        else:  # recompute | precompute, optionally -compiled (megafox.model.loss_kernels)
            grad_mode, _, kernel = variant.partition("-")
            losses = fused_linear_cross_entropy(hidden, weight, labels, mask if grad_mode == "precompute" else None,
                                                chunk_tokens=args.loss_chunk_tokens, kernel=kernel or "eager")
        (losses * mask).sum().backward()
        weight.main_grad.add_(weight.grad)
        hidden.grad = weight.grad = None

    _sync()
    base = torch.cuda.memory_allocated() if CUDA else _rss_bytes()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    dt = timed(step, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() if CUDA else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the bf16 weight.grad (V x H; zeros for the fused variants, see fused_loss) is produced by
    # every variant and is part of the figure; the fp32 main_grad is not (allocated before `base`)
    return dict(variant=variant, tokens=n, vocab=v, hidden=h, dtype=str(dtype).replace("torch.", ""),
                chunk=chunk_size(args.loss_chunk_tokens, v) if variant != "unfused" else None,
                time_ms=dt * 1e3, extra_peak_gib=max(0, peak - base) / 2 ** 30,
                memory="cuda max_memory_allocated" if CUDA else "process peak RSS")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------
# Driver: one process per measurement (GPU) or all in this process, a table, JSON.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_subprocess(what: list, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *what, *_forward_args(args)]
    env = dict(os.environ, MASTER_PORT=str(_free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}"}


def _forward_args(args) -> list:
    out = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--recompute", args.recompute,
           "--loss-grad", args.loss_grad, "--loss-kernel", args.loss_kernel, "--impl", args.impl,
           *(["--compile-layers"] if args.compile_layers else []), "--loss-chunk-tokens", str(args.loss_chunk_tokens),
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    return out + (["--tiny"] if args.tiny else [])


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results: list, systems: list) -> str:
    head = f"{'seq':>6} {'mbs':>3} {'system':<16} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"
    ratios = [s for s in systems if s != "megafox"] if "megafox" in systems else []
    head += "".join(f" {'x ' + s:>17}" for s in ratios)
    lines = [head, "-" * len(head)]
    by = {(r["seq"], r["system"]): r for r in results}
    for seq in sorted({r["seq"] for r in results}):
        for s in systems:
            r = by.get((seq, s))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{seq:>6} {r.get('mbs', '?'):>3} {s:<16} ERROR {r['error'][:100]}")
                continue
            row = (f"{seq:>6} {r['mbs']:>3} {s:<16} {r['tokens_per_s']:>10.0f} {r['model_tflops']:>8.3g} "
                   f"{100 * r['mfu']:>5.1f}% {_fmt(r['peak_gib'], '9.1f'):>9}")
            if s == "megafox":
                for o in ratios:
                    other = by.get((seq, o))
                    ok = other and "error" not in other
                    row += f" {(format(r['tokens_per_s'] / other['tokens_per_s'], '.2f') + 'x') if ok else '-':>17}"
            lines.append(row)
    return "\n".join(lines)


def loss_table(results: list) -> str:
    lines = [f"{'variant':<19} {'tokens':>7} {'vocab':>7} {'hidden':>6} {'dtype':>8} {'chunk':>6} "
             f"{'ms':>9} {'extra peak GiB':>15}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r.get('variant', '?'):<19} ERROR {r['error'][:100]}")
            continue
        lines.append(f"{r['variant']:<19} {r['tokens']:>7} {r['vocab']:>7} {r['hidden']:>6} {r['dtype']:>8} "
                     f"{_fmt(r['chunk'], 'd'):>6} {r['time_ms']:>9.1f} {r['extra_peak_gib']:>15.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="megafox,hf,mcore", help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--seqs", default=None, help="comma list (default 2048,4096,8192; --tiny: 32,64)")
    p.add_argument("--mbs", default="1", help="micro-batch size: one value, or one per --seqs entry")
    p.add_argument("--tiny", action="store_true", help="tiny model (the CPU smoke check)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--impl", default="native", choices=["native", "local", "te", "auto"])
    p.add_argument("--loss-grad", default="precompute", choices=["precompute", "recompute"],
                   help="fused loss variant for megafox (precompute passes loss_mask to the model)")
    p.add_argument("--loss-chunk-tokens", type=int, default=4096)
    p.add_argument("--loss-kernel", default="eager", choices=["eager", "compiled"],
                   help="fused loss softmax/gradient: torch ops or torch.compile'd kernels")
    p.add_argument("--compile-layers", action="store_true", help="megafox: torch.compile each decoder layer")
    p.add_argument("--in-process", action="store_true", help="no worker processes (default with --tiny)")
    p.add_argument("--isolate", action="store_true", help="one worker process per measurement even with --tiny")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--loss-only", action="store_true", help="LM head + loss microbenchmark only")
    p.add_argument("--variants", default="unfused,recompute,precompute",
                   help="--loss-only variants: unfused, recompute, precompute, recompute-compiled, precompute-compiled")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    big = CUDA and not args.tiny
    if args.warmup is None:
        args.warmup = 3 if big else 1
    if args.steps is None:
        args.steps = 5 if big else 2
    args.tokens = args.tokens or (8192 if big else 2048)
    args.vocab = args.vocab or (256000 if big else 32768)
    args.hidden = args.hidden or (2048 if big else 512)
    if args.loss_only and not big and args.loss_chunk_tokens == 4096:
        args.loss_chunk_tokens = 256  # so the moderate CPU size is chunked at all
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind = args.worker[0]
        res = loss_only(args.worker[1], args) if kind == "loss" else \
            measure(kind, int(args.worker[1]), int(args.worker[2]), args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    in_process = args.in_process or (args.tiny and not args.isolate)
    if args.loss_only:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        # peak RSS is per process: every variant gets its own, even in-process mode
        results = [_in_subprocess(["loss", v], args) | ({"variant": v}) for v in variants]
        print(loss_table(results))
        out = {"kind": "loss_only", "results": results}
    else:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = sorted(set(systems) - set(SYSTEMS))
        if unknown:
            print(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
            return 2
        seqs = [int(s) for s in (args.seqs or ("32,64" if args.tiny else "2048,4096,8192")).split(",")]
        mbs = [int(b) for b in args.mbs.split(",")]
        if len(mbs) == 1:
            mbs = mbs * len(seqs)
        if len(mbs) != len(seqs):
            print(f"--mbs: give one value or one per sequence length ({len(seqs)})", file=sys.stderr)
            return 2
        results = []
        for seq, b in zip(seqs, mbs):
            for s in systems:
                r = measure(s, seq, b, args) if in_process else _in_subprocess([s, str(seq), str(b)], args)
                r.setdefault("system", s)
                r.setdefault("seq", seq)
                results.append(r)
                print("RESULT " + json.dumps(r), flush=True)
        print(table(results, systems))
        out = {"kind": "throughput", "model": "bench-tiny" if args.tiny else "fox1-1.6b",
               "recompute": args.recompute, "impl": args.impl, "loss_grad": args.loss_grad, "loss_kernel": args.loss_kernel,
               "compile_layers": args.compile_layers,
               "peak_tflops": PEAK_TFLOPS, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
