"""The demo's last step: generate from the exported HF models, plot the loss curves, summarize.

    python demo/report.py --out demo_out --prompt "def read_file(path):"

Reads the trainer's per-step records (<checkpoint.dir>/metrics/<stage>.jsonl, through
megafox.report, whose `megafox report` plots any run), the tokenized
stage data (for the unigram entropy, the loss a model that ignores context would reach) and the
HF exports; writes OUT/loss_curve.png, OUT/sft_loss.png (the instruction-tuning stage's masked
loss), OUT/summary.md and OUT/summary.json, with one chat exchange with the instruct model through
its exported chat template. Exits 1 when the final training loss is not well below the unigram
entropy (the model learned nothing), or when instruction tuning did not lower its masked loss.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from megafox.report import ReportError, StageRecords, plot_loss, read_run

STAGES = ("stage1", "stage2", "stage3")


def read_metrics(metrics_dir: Path) -> Dict[str, List[dict]]:
    """Per stage, training records by iteration (a resumed stage's repeats keep the last)."""
    return {s.name: s.train for s in _stages(metrics_dir) if s.name in STAGES}


def read_validation(metrics_dir: Path) -> Dict[str, List[dict]]:
    return {s.name: s.valid for s in _stages(metrics_dir) if s.name in STAGES}


def _stages(metrics_dir: Path):
    try:
        return read_run(metrics_dir.parent)
    except ReportError:
        return []


def stage_tokens(blend_path: Path) -> np.ndarray:
    """All token ids of a stage's datasets (the indexed .bin files named by blend.json)."""
    import warnings

    from megafox.formats.indexed import read_idx
    from megafox.data.blend import read_blend

    # read_blend opens the indexes through megatron-core, which warns that TE/apex are absent (fine on CPU)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

    arrays = []
    for ds in read_blend(str(blend_path)).datasets:
        dtype, _, _ = read_idx(f"{ds.prefix}.idx")
        arrays.append(np.fromfile(f"{ds.prefix}.bin", dtype=dtype))
    return np.concatenate(arrays)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequency distribution, in nats (the loss's unit)."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def plot(metrics: Dict[str, List[dict]], validation: Dict[str, List[dict]], entropy: float, path: Path) -> None:
    """`megafox report`'s loss plot, with the unigram entropy and each stage's sequence length."""
    stages = [StageRecords(name, recs, validation.get(name) or []) for name, recs in metrics.items() if recs]
    labels = {s.name: f"{s.name} train (seq {s.train[0].get('seq_length', '?')})" for s in stages}
    plot_loss(stages, path, title="megafox demo: Fox-shaped model, 3-stage curriculum (dashed lines: stage starts)",
              hlines=[(entropy, f"unigram entropy {entropy:.2f} nats")], labels=labels)


def read_sft(metrics_dir: Path) -> Dict[str, List[dict]]:
    """The sft stage's training and validation records (its own checkpoint dir's metrics)."""
    path = metrics_dir / "sft.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    by_iter = {r["iteration"]: r for r in records if "loss" in r}
    return {"train": [by_iter[i] for i in sorted(by_iter)], "valid": [r for r in records if "valid_loss" in r]}


def plot_sft(sft: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["iteration"] for r in sft["train"]], [r["loss"] for r in sft["train"]], lw=1.2,
            label="train: assistant tokens only (prompt-masked)")
    if sft["valid"]:
        ax.plot([r["iteration"] for r in sft["valid"]], [r["valid_loss"] for r in sft["valid"]], "o", ms=4,
                label="held-out conversations")
    ax.set_xlabel("step")
    ax.set_ylabel("masked cross-entropy (nats/token)")
    ax.set_title("megafox demo: instruction tuning (packed conversations, from the pretrained weights)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def chat(hf_dir: Path, question: str, max_new_tokens: int) -> Dict[str, str]:
    """One exchange with the instruct model, formatted by the chat template it was exported with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    # seeded sampling with a repetition penalty: a model this small, greedily decoded, tends to
    # repeat its likeliest token (often a newline) for the whole reply
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=20, temperature=0.7,
                             repetition_penalty=1.3, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return {"prompt": prompt, "reply": tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)}


def generate(hf_dir: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=20, temperature=0.7,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--checkpoints", default=None, help="default OUT/checkpoints")
    parser.add_argument("--config", default="configs/train/demo.yaml", help="for the stages' sequence lengths")
    parser.add_argument("--prompt", default="def read_config(path):\n")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the demo started")
    parser.add_argument("--margin", type=float, default=0.5, help="nats below the unigram entropy required")
    parser.add_argument("--question", default="What does json.dumps do?", help="asked to the instruct model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    ckpt = Path(args.checkpoints) if args.checkpoints else out / "checkpoints"
    metrics, validation = read_metrics(ckpt / "metrics"), read_validation(ckpt / "metrics")
    missing = [s for s in STAGES if not metrics.get(s)]
    if missing:
        print(f"report: no training records for {', '.join(missing)} in {ckpt / 'metrics'}", file=sys.stderr)
        return 1
    import os
    import shlex

    from megafox.config import load_train_config

    # the config the stages trained with: the file plus the same MEGAFOX_OVERRIDES the trainer read
    config = load_train_config(args.config, shlex.split(os.environ.get("MEGAFOX_OVERRIDES", "")))
    seq = {s.name: s.seq_length for s in config.stages}
    for stage in STAGES:
        for rec in metrics[stage]:
            rec.setdefault("seq_length", seq.get(stage))
    all_tokens = np.concatenate([stage_tokens(out / "data" / s / "blend.json") for s in STAGES])
    entropy = unigram_entropy(all_tokens)
    per_stage = {}
    for stage in STAGES:
        recs = metrics[stage]
        tail = recs[-max(1, len(recs) // 10):]
        per_stage[stage] = {
            "seq_length": recs[0].get("seq_length"),
            "steps": len(recs),
            "tokens": recs[-1]["consumed_tokens"] - recs[0]["consumed_tokens"] + recs[0].get("batch_tokens", 0),
            "first_loss": recs[0]["loss"],
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "valid_loss": (validation.get(stage) or [{}])[-1].get("valid_loss"),
        }
    final = per_stage["stage3"]["final_loss"]
    plot(metrics, validation, entropy, out / "loss_curve.png")
    sample = generate(out / "hf", args.prompt, args.max_new_tokens)
    sft = read_sft(out / "checkpoints_sft" / "metrics")
    if not sft["train"]:
        print(f"report: no instruction-tuning records in {out / 'checkpoints_sft' / 'metrics'}", file=sys.stderr)
        return 1
    plot_sft(sft, out / "sft_loss.png")
    tail = sft["train"][-max(1, len(sft["train"]) // 10):]
    sft_summary = {"steps": len(sft["train"]), "first_loss": sft["train"][0]["loss"],
                   "final_loss": sum(r["loss"] for r in tail) / len(tail),
                   "valid_loss": sft["valid"][-1]["valid_loss"] if sft["valid"] else None}
    exchange = chat(out / "hf_instruct", args.question, args.max_new_tokens)
    summary = {
        "corpus_tokens": int(all_tokens.size),
        "unigram_entropy_nats": entropy,
        "final_loss": final,
        "stages": per_stage,
        "trained_tokens": metrics["stage3"][-1]["consumed_tokens"],
        "elapsed_s": (time.time() - args.started) if args.started else None,
        "prompt": args.prompt,
        "generation": sample,
        "sft": sft_summary,
        "chat": {"question": args.question, **exchange},
        "artefacts": {"corpus": str(out / "corpus"), "data": str(out / "data"), "checkpoints": str(ckpt),
                      "hf_model": str(out / "hf"), "loss_curve": str(out / "loss_curve.png"),
                      "tensorboard": str(out / "tensorboard"), "chat_data": str(out / "data_sft"),
                      "sft_checkpoints": str(out / "checkpoints_sft"), "hf_instruct_model": str(out / "hf_instruct"),
                      "sft_loss_curve": str(out / "sft_loss.png")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# megafox demo summary", "",
             f"- corpus: {summary['corpus_tokens']:,} tokens (Python docs prose + CPython stdlib code)",
             f"- unigram entropy: {entropy:.3f} nats/token; final training loss: {final:.3f}",
             f"- trained tokens: {summary['trained_tokens']:,}"
             + (f" in {summary['elapsed_s'] / 60:.1f} min (whole demo)" if args.started else ""), "",
             "| stage | seq | steps | tokens | first loss | final loss | valid loss |", "|---|---|---|---|---|---|---|"]
    for stage, s in per_stage.items():
        valid = f"{s['valid_loss']:.3f}" if s["valid_loss"] is not None else "-"
        lines.append(f"| {stage} | {s['seq_length']} | {s['steps']} | {s['tokens']:,} | {s['first_loss']:.3f} | "
                     f"{s['final_loss']:.3f} | {valid} |")
    valid = f", held-out {sft_summary['valid_loss']:.3f}" if sft_summary["valid_loss"] is not None else ""
    lines += ["", "Generated by the exported HF model (transformers):", "", "```",
              args.prompt + sample, "```", "",
              f"Instruction tuning: {sft_summary['steps']} steps, masked loss {sft_summary['first_loss']:.3f} -> "
              f"{sft_summary['final_loss']:.3f}{valid}. A chat with the exported instruct model, through the "
              f"chat template in its tokenizer_config (`apply_chat_template`):", "", "```",
              exchange["prompt"] + exchange["reply"], "```", "", "Artefacts:"]
    lines += [f"- {k}: {v}" for k, v in summary["artefacts"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not final < entropy - args.margin:
        print(f"report: final loss {final:.3f} is not {args.margin} nats below the unigram entropy {entropy:.3f}",
              file=sys.stderr)
        return 1
    if not sft_summary["final_loss"] < sft_summary["first_loss"]:
        print(f"report: instruction tuning did not lower the masked loss ({sft_summary['first_loss']:.3f} -> "
              f"{sft_summary['final_loss']:.3f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
