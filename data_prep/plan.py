"""Run a YAML data plan: tokenizer (train if needed) + every curriculum stage -> blend.json.

    python -m data_prep.plan --plan configs/data/fox1.yaml [--output-dir DIR] [--stage stage1 ...]
        [--workers N] [--validate] [--tokenizer-only]
        [--array-index I --array-count N]   # SLURM array task: a slice of every source's shards
        [--finalize]                        # merge the slices, write manifests and blend.json files
        [--dedup-merge]                     # between two array runs: the stages' dedup merge (data_prep/dedup.py)

Outputs: <output_dir>/<stage>/<source>.{bin,idx,manifest.json} and <output_dir>/<stage>/blend.json
(the blend.json contract: megafox/formats/blend.py, its one writer and reader).  Plan format: see configs/data/tiny.yaml;
a stage with `kind: sft` holds chat records instead (configs/data/fox1_sft.yaml, data_prep/sft.py).
Paths in the plan may use environment variables (${VAR}); ${PYTHON_STDLIB} defaults to this
Python's standard library directory.  Relative paths are relative to the current directory.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

from . import dedup
from .common import DataPrepError, cli_main, command_parser, expand_inputs
from .preprocess import Options, preprocess
from .sft import run_sft_stage, stage_settings
from .train_tokenizer import train
from megafox.config import ConfigError
from megafox.config.data_plan import expand_vars, read_plan
from megafox.formats.blend import BlendDataset, BlendRecord
from megafox.formats.indexed import mask_prefix
from megafox.formats.tokenizer import TokenizerError, load_sentencepiece


class PlanError(DataPrepError):
    pass


def load_plan(path: str, output_dir: Optional[str] = None) -> dict:
    """Parse and validate a plan (megafox.config.data_plan, plus the sections data_prep owns: the
    stages' dedup / decontaminate settings, the sft stages' chat template); errors name the file
    and the field."""
    try:
        typed = read_plan(path, output_dir)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    plan = typed.as_dict()
    for sname, stage in typed.stages.items():
        W = f"{path}: stages.{sname}"
        st = plan["stages"][sname]
        st["dedup"] = dedup.dedup_settings(stage.dedup, f"{W}.dedup", PlanError)
        st["decontaminate"] = dedup.decontam_settings(stage.decontaminate, f"{W}.decontaminate", PlanError, expand_vars)
        if stage.kind == "sft":
            try:
                st["sft"] = stage_settings(stage.sft_fields(), st["sources"], f"stages.{sname}")
            except DataPrepError as e:
                raise PlanError(f"{path}: {e}") from None
    return plan


def ensure_tokenizer(plan: dict, quiet: bool = False) -> str:
    tok = plan["tokenizer"]
    if "train" in tok:
        t = tok["train"]
        try:
            return train(t["inputs"], t["vocab_size"], t["output"], t["json_key"], t["format"], t["sample_mb"],
                         t["seed"], quiet=quiet)
        except DataPrepError as e:
            raise PlanError(f"{plan['path']}: tokenizer.train: {e}") from None
    try:
        load_sentencepiece(tok["model"])
    except TokenizerError as e:
        raise PlanError(f"{plan['path']}: tokenizer.model: {e}") from None
    return tok["model"]


def _source_options(plan, stage, src, tok_path, workers, array_index=None, array_count=None, quiet=False):
    try:
        inputs = expand_inputs(src["globs"], what="glob")
    except DataPrepError as e:
        raise PlanError(f"{plan['path']}: {src['where'].split(': ', 1)[-1]}.globs: {e}") from None
    pp = plan["preprocess"]
    prefix = os.path.join(plan["output_dir"], stage, src["name"])
    return Options(inputs, tok_path, prefix, json_key=src["json_key"],
                   workers=workers or pp["workers"] or os.cpu_count() or 1, append_eod=pp["append_eod"],
                   dtype=pp["dtype"], fmt=src["format"], shards=pp["shards"], array_index=array_index,
                   array_count=array_count, chunk_bytes=int(pp["chunk_mb"] * (1 << 20)), quiet=quiet)


def blend_record(plan: dict, stage: str, manifests: Dict[str, dict], tok_path: str) -> BlendRecord:
    """A stage's blend.json from its sources' manifests (an sft stage's with its masks and template)."""
    d = os.path.join(plan["output_dir"], stage)
    st = plan["stages"][stage]
    sft = st["sft"] if st["kind"] == "sft" else None
    datasets = []
    for src in st["sources"]:
        m = manifests[src["name"]]
        datasets.append(BlendDataset(
            prefix=src["name"], weight=src["weight"] if src["weight"] is not None else m["documents"],
            documents=m["documents"], tokens=m["tokens"],
            removed=m.get("removed"),  # provenance: what the stage's dedup / decontamination left out (dedup.py)
            mask_prefix=os.path.basename(mask_prefix(src["name"])) if sft else None,
            trained_tokens=m["trained_tokens"] if sft else None))
    rec = BlendRecord(stage=stage, datasets=datasets, token_budget=st["token_budget"],
                      tokenizer=(os.path.relpath(tok_path, d) if tok_path.startswith(plan["output_dir"] + os.sep)
                                 else os.path.abspath(tok_path)))
    if dedup.enabled(plan, stage):
        rec.dedup = {"dedup": st.get("dedup"), "decontaminate": st.get("decontaminate"),
                     "report": "dedup_report.json"}
    if sft:
        t = sft["chat_template"]
        rec.kind, rec.seq_length = "sft", sft["seq_length"]
        rec.chat_template, rec.chat_template_name, rec.chat_template_sha256 = t.text, t.name, t.sha256
    return rec


def write_blend(plan: dict, stage: str, manifests: Dict[str, dict], tok_path: str) -> str:
    return blend_record(plan, stage, manifests, tok_path).write(os.path.join(plan["output_dir"], stage, "blend.json"))


def run_plan(plan: dict, stages: Optional[List[str]] = None, workers: int = 0, array_index=None,
             array_count=None, finalize: bool = False, quiet: bool = False, dedup_merge: bool = False) -> Dict[str, str]:
    """Returns {stage: blend.json path} (empty for an array task).  dedup_merge: only the dedup merge
    step of the stages that have one (data_prep/dedup.py)."""
    tok_path = ensure_tokenizer(plan, quiet=quiet)
    todo = stages or list(plan["stages"])
    for s in todo:
        if s not in plan["stages"]:
            raise PlanError(f"{plan['path']}: stages: no stage named {s!r} (have {', '.join(plan['stages'])})")
    blends: Dict[str, str] = {}
    for stage in todo:
        sft = plan["stages"][stage]["kind"] == "sft"
        if sft:  # chat records -> tokens + loss masks (data_prep/sft.py)
            manifests = run_sft_stage(plan, stage, tok_path, workers, array_index, array_count, finalize, quiet)
        else:
            manifests = _pretrain_stage(plan, stage, tok_path, workers, array_index, array_count, finalize, quiet,
                                        dedup_merge)
        if manifests is None or array_count is not None:
            continue
        blends[stage] = write_blend(plan, stage, manifests, tok_path)
        if not quiet:
            tot = sum(m["tokens"] for m in manifests.values())
            trained = (f" ({sum(m['trained_tokens'] for m in manifests.values()):,} trained)" if sft else "")
            budget = plan["stages"][stage]["token_budget"]
            print(f"{stage}: {tot:,} tokens{trained} in {len(manifests)} sources, budget {budget:,} "
                  f"({budget / max(tot, 1):.2f} epochs) -> {blends[stage]}", flush=True)
    return blends


def _pretrain_stage(plan: dict, stage: str, tok_path: str, workers: int, array_index, array_count, finalize: bool,
                    quiet: bool, dedup_merge: bool) -> Optional[Dict[str, dict]]:
    """Preprocess a pretraining stage's sources (after its dedup); their manifests, or None when this
    job's part of the stage stops before tokenizing (a dedup step, --dedup-merge)."""
    filters: Dict[str, object] = {}
    if dedup.enabled(plan, stage):
        found = dedup.run_stage(plan, stage, workers or plan["preprocess"]["workers"] or os.cpu_count() or 1,
                                array_index, array_count, finalize, dedup_merge, quiet)
        if found is None:  # this job's part of the dedup is done; tokenizing needs the other steps
            return None
        filters = found
    if dedup_merge:
        return None
    manifests = {}
    for src in plan["stages"][stage]["sources"]:
        opts = _source_options(plan, stage, src, tok_path, workers, array_index, array_count, quiet)
        opts.drop_filter = filters.get(src["name"])
        manifests[src["name"]] = preprocess(opts, merge_only=finalize)
    return manifests


@cli_main
def main(argv=None) -> int:
    p = command_parser("data_prep.plan", __doc__)
    p.add_argument("--plan", required=True, help="YAML data plan (configs/data/*.yaml)")
    p.add_argument("--output-dir", default=None, help="override the plan's output_dir")
    p.add_argument("--stage", action="append", default=None, help="only these stages (repeatable)")
    p.add_argument("--workers", type=int, default=0, help="override preprocess.workers (0: the plan's / all cores)")
    p.add_argument("--validate", action="store_true", help="only check the plan")
    p.add_argument("--tokenizer-only", action="store_true", help="only train/check the tokenizer")
    p.add_argument("--array-index", type=int, default=None)
    p.add_argument("--array-count", type=int, default=None)
    p.add_argument("--finalize", action="store_true", help="merge array-task shards and write blend.json files")
    p.add_argument("--dedup-merge", action="store_true",
                   help="the dedup merge step of the stages with dedup/decontaminate (after the array tasks' "
                        "signatures; with --array-index/--array-count: a slice of the buckets)")
    p.add_argument("--dedup-stages", action="store_true", help="print the stages with dedup/decontaminate and exit")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if (a.array_index is None) != (a.array_count is None):
        raise DataPrepError("--array-index and --array-count go together")
    plan = load_plan(a.plan, a.output_dir)
    if a.validate:
        n = sum(len(s["sources"]) for s in plan["stages"].values())
        print(f"{a.plan}: ok ({len(plan['stages'])} stages, {n} sources)")
        return 0
    if a.dedup_stages:
        print(" ".join(s for s in plan["stages"] if dedup.enabled(plan, s)))
        return 0
    if a.tokenizer_only:
        print(ensure_tokenizer(plan, quiet=a.quiet))
        return 0
    run_plan(plan, a.stage, a.workers, a.array_index, a.array_count, a.finalize, a.quiet, a.dedup_merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
