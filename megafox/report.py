"""`megafox report RUN_DIR`: a run's curves as PNGs and a short markdown summary, from its metrics
files alone (<RUN_DIR>/metrics/<stage>.jsonl, as megafox.training.callbacks.metrics writes them).

    loss.png        training loss per stage and validation loss, dashed lines at the stage starts
    lr.png          learning rate
    throughput.png  tokens/s and MFU (logging intervals)
    grad_norm.png   gradient norm (log scale)
    timers.png      mean seconds per step in each phase, per stage
    eval.png        in-loop downstream eval scores (when the run had them)
    summary.md      per stage: steps, tokens, first/final loss, validation, throughput, MFU, skipped steps

Works for any run directory (a checkpoint.dir), during or after training; a step re-run after a
resume counts once (its latest record).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PHASES = ("data", "forward_backward", "grad_reduce", "optimizer", "checkpoint", "validation", "eval")


class ReportError(RuntimeError):
    """Nothing to report on; the message names the path."""


@dataclass
class StageRecords:
    name: str
    train: List[dict] = field(default_factory=list)  # one per iteration, in order
    valid: List[dict] = field(default_factory=list)
    scores: List[dict] = field(default_factory=list)  # other callbacks' numbers (eval/...)


def read_stage(path: Path) -> StageRecords:
    by_iteration, stage = {}, StageRecords(path.stem)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ReportError(f"{path}:{number}: not a JSON record") from None
        if "loss" in record:
            by_iteration[record["iteration"]] = record
        elif "valid_loss" in record:
            stage.valid.append(record)
        else:
            stage.scores.append(record)
    stage.train = [by_iteration[i] for i in sorted(by_iteration)]
    return stage


def read_run(run_dir: Path) -> List[StageRecords]:
    """Every stage with records, in the order the run trained them."""
    metrics_dir = Path(run_dir) / "metrics"
    stages = [read_stage(p) for p in sorted(metrics_dir.glob("*.jsonl"))] if metrics_dir.is_dir() else []
    stages = [s for s in stages if s.train]
    if not stages:
        raise ReportError(f"{metrics_dir}: no metrics (<stage>.jsonl with training records) to report on")
    return sorted(stages, key=lambda s: s.train[0]["consumed_tokens"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _start(stage: StageRecords) -> float:
    return stage.train[0]["consumed_tokens"] - stage.train[0].get("batch_tokens", 0)


def plot_loss(stages: Sequence[StageRecords], path: Path, title: str = "training and validation loss",
              hlines: Sequence[Tuple[float, str]] = (), labels: Optional[Dict[str, str]] = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, stage in enumerate(stages):
        color = f"C{i}"
        ax.plot([r["consumed_tokens"] for r in stage.train], [r["loss"] for r in stage.train], color=color,
                lw=1.2, label=(labels or {}).get(stage.name, f"{stage.name} train"))
        ax.axvline(_start(stage), color="grey", ls="--", lw=0.8)
        if stage.valid:
            ax.plot([v["consumed_tokens"] for v in stage.valid], [v["valid_loss"] for v in stage.valid], "o",
                    color=color, ms=4, label=f"{stage.name} validation")
    for value, label in hlines:
        ax.axhline(value, color="red", ls=":", lw=1, label=label)
    ax.set_xlabel("consumed tokens")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    _finish(fig, ax, path)


def _finish(fig, ax, path: Path) -> None:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _plot_key(stages, key: str, ylabel: str, path: Path, log: bool = False) -> bool:
    points = [(s, [r for r in s.train if isinstance(r.get(key), (int, float))]) for s in stages]
    if not any(recs for _, recs in points):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (stage, recs) in enumerate(points):
        ax.plot([r["consumed_tokens"] for r in recs], [r[key] for r in recs], color=f"C{i}", lw=1.2, label=stage.name)
        ax.axvline(_start(stage), color="grey", ls="--", lw=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("consumed tokens")
    ax.set_ylabel(ylabel)
    _finish(fig, ax, path)
    return True


def _plot_throughput(stages, path: Path) -> bool:
    recs = [(i, r) for i, s in enumerate(stages) for r in s.train if "tokens_per_s" in r]
    if not recs:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([r["consumed_tokens"] for _, r in recs], [r["tokens_per_s"] for _, r in recs], "C0.-", lw=1,
            label="tokens/s (all ranks)")
    right = ax.twinx()
    right.plot([r["consumed_tokens"] for _, r in recs], [100 * r["mfu"] for _, r in recs], "C1.-", lw=1)
    right.set_ylabel("MFU (%)", color="C1")
    for stage in stages:
        ax.axvline(_start(stage), color="grey", ls="--", lw=0.8)
    ax.set_xlabel("consumed tokens")
    ax.set_ylabel("tokens/s", color="C0")
    _finish(fig, ax, path)
    return True


def phase_means(stage: StageRecords) -> Dict[str, float]:
    """Mean seconds per step of each phase, and of the whole step (`step`)."""
    recs = [r for r in stage.train if "time/step" in r]
    if not recs:
        return {}
    out = {"step": sum(r["time/step"] for r in recs) / len(recs)}
    for name in PHASES:
        out[name] = sum(r.get(f"time/{name}", 0.0) for r in recs) / len(recs)
    return out


def _plot_timers(stages, path: Path) -> bool:
    means = [(s.name, phase_means(s)) for s in stages]
    means = [(name, m) for name, m in means if m]
    if not means:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom = [0.0] * len(means)
    for i, phase in enumerate(PHASES + ("other",)):
        heights = [m[phase] if phase != "other" else max(m["step"] - sum(m[p] for p in PHASES), 0.0) for _, m in means]
        if any(heights):
            ax.bar([name for name, _ in means], heights, bottom=bottom, color=f"C{i}", label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds per step (mean)")
    _finish(fig, ax, path)
    return True


def _plot_scores(stages, path: Path) -> bool:
    keys = sorted({k for s in stages for r in s.scores for k, v in r.items()
                   if k.startswith("eval/") and k != "eval/time_s" and isinstance(v, (int, float))})
    if not keys:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, key in enumerate(keys):
        recs = [r for s in stages for r in s.scores if key in r]
        ax.plot([r["consumed_tokens"] for r in recs], [r[key] for r in recs], "o-", color=f"C{i % 10}", ms=3, label=key)
    for stage in stages:
        ax.axvline(_start(stage), color="grey", ls="--", lw=0.8)
    ax.set_xlabel("consumed tokens")
    ax.set_ylabel("score")
    _finish(fig, ax, path)
    return True


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def summary(run_dir: Path, stages: Sequence[StageRecords], plots: Sequence[str]) -> str:
    lines = [f"# Run report: {run_dir}", "",
             f"- stages: {', '.join(s.name for s in stages)}; steps: {sum(len(s.train) for s in stages)}; "
             f"tokens: {stages[-1].train[-1]['consumed_tokens']:,}", "",
             "| stage | steps | tokens | first loss | final loss | last valid loss | tokens/s | MFU | skipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        perf = [r for r in s.train if "tokens_per_s" in r]
        tps = sum(r["tokens_per_s"] for r in perf) / len(perf) if perf else None
        mfu = 100 * sum(r["mfu"] for r in perf) / len(perf) if perf else None
        tokens = s.train[-1]["consumed_tokens"] - _start(s)
        valid = s.valid[-1]["valid_loss"] if s.valid else None
        skipped = sum(1 for r in s.train if r.get("skipped"))
        lines.append(f"| {s.name} | {len(s.train)} | {tokens:,} | {_fmt(s.train[0]['loss'])} | "
                     f"{_fmt(s.train[-1]['loss'])} | {_fmt(valid)} | {_fmt(tps, ',.0f')} | {_fmt(mfu, '.2f')}% | {skipped} |")
    timed = [(s.name, phase_means(s)) for s in stages if phase_means(s)]
    if timed:
        lines += ["", "Mean seconds per step by phase:", "",
                  "| stage | step | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 2) + "|"]
        lines += [f"| {name} | {m['step']:.3f} | " + " | ".join(f"{m[p]:.3f}" for p in PHASES) + " |"
                  for name, m in timed]
    scores = {k: v for s in stages for r in s.scores for k, v in r.items()
              if k.startswith("eval/") and isinstance(v, (int, float))}
    if scores:
        lines += ["", "Last in-loop eval scores:", ""] + [f"- {k}: {v:.4g}" for k, v in sorted(scores.items())]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, out: Path) -> List[str]:
    stages = read_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(stages, out / "loss.png")
    plots = ["loss.png"]
    for name, made in (("lr.png", lambda p: _plot_key(stages, "lr", "learning rate", p)),
                       ("throughput.png", lambda p: _plot_throughput(stages, p)),
                       ("grad_norm.png", lambda p: _plot_key(stages, "grad_norm", "gradient norm", p, log=True)),
                       ("timers.png", lambda p: _plot_timers(stages, p)),
                       ("eval.png", lambda p: _plot_scores(stages, p))):
        if made(out / name):
            plots.append(name)
    (out / "summary.md").write_text(summary(run_dir, stages, plots))
    return plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's checkpoint.dir (holds metrics/<stage>.jsonl)")
    parser.add_argument("--out", default=None, help="where the PNGs and summary.md go (default RUN_DIR/report)")


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "report"
    try:
        plots = write_report(run_dir, out)
    except ReportError as exc:
        print(f"megafox report: error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {out / 'summary.md'} and {', '.join(plots)} in {out}")
    return 0
