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

import argparse
import os
import re
import sys
import sysconfig
from typing import Dict, List, Optional

from . import dedup
from .common import FORMATS, DataPrepError, expand_inputs, run_main, setup_logging
from .preprocess import Options, preprocess
from .sft import run_sft_stage
from .train_tokenizer import train
from megafox.formats.blend import BlendDataset, BlendRecord
from megafox.formats.indexed import mask_prefix
from megafox.formats.tokenizer import TokenizerError, load_sentencepiece

STAGE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class PlanError(DataPrepError):
    pass


def _expand(s: str) -> str:
    env = dict(os.environ)
    env.setdefault("PYTHON_STDLIB", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), s))


def _num(v, where: str, positive: bool = True, integer: bool = False):
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise PlanError(f"{where}: must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanError(f"{where}: must be a number, got {v!r}")
    if positive and not v > 0:
        raise PlanError(f"{where}: must be > 0, got {v!r}")
    if integer:
        if float(v) != int(v):
            raise PlanError(f"{where}: must be a whole number, got {v!r}")
        v = int(v)
    return v


def _globs(v, where: str) -> List[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise PlanError(f"{where}: must be a glob or a non-empty list of globs")
    return [_expand(x) for x in v]


def _check_keys(d: dict, allowed, where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise PlanError(f"{where}: unknown field(s) {', '.join(extra)} (allowed: {', '.join(allowed)})")


def load_plan(path: str, output_dir: Optional[str] = None) -> dict:
    """Parse and validate a plan; errors name the file and the field."""
    import yaml

    if not os.path.isfile(path):
        raise PlanError(f"{path}: plan file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    P = path
    if not isinstance(raw, dict):
        raise PlanError(f"{P}: expected a mapping at the top level")
    _check_keys(raw, ("output_dir", "tokenizer", "preprocess", "stages", "name", "description"), P)
    out_dir = os.path.abspath(_expand(output_dir or str(raw.get("output_dir") or "data")))
    plan: Dict = {"path": os.path.abspath(path), "output_dir": out_dir}

    tok = raw.get("tokenizer")
    if not isinstance(tok, dict):
        raise PlanError(f"{P}: tokenizer: required, with either 'model' or 'train'")
    _check_keys(tok, ("model", "train"), f"{P}: tokenizer")
    if ("model" in tok) == ("train" in tok):
        raise PlanError(f"{P}: tokenizer: give exactly one of 'model' (existing .model) or 'train'")
    if "model" in tok:
        if not isinstance(tok["model"], str) or not tok["model"]:
            raise PlanError(f"{P}: tokenizer.model: must be a path to a SentencePiece .model")
        plan["tokenizer"] = {"model": os.path.abspath(_expand(tok["model"]))}
    else:
        t = tok["train"]
        W = f"{P}: tokenizer.train"
        if not isinstance(t, dict):
            raise PlanError(f"{W}: must be a mapping with inputs, vocab_size, output")
        _check_keys(t, ("inputs", "vocab_size", "output", "json_key", "format", "sample_mb", "seed"), W)
        if "inputs" not in t:
            raise PlanError(f"{W}.inputs: required")
        fmt = t.get("format", "auto")
        if fmt not in FORMATS:
            raise PlanError(f"{W}.format: must be one of {', '.join(FORMATS)}")
        plan["tokenizer"] = {"train": {
            "inputs": _globs(t["inputs"], f"{W}.inputs"),
            "vocab_size": _num(t.get("vocab_size", 256000), f"{W}.vocab_size", integer=True),
            "output": os.path.abspath(_expand(str(t.get("output") or os.path.join(out_dir, "tokenizer")))),
            "json_key": str(t.get("json_key", "text")),
            "format": fmt,
            "sample_mb": _num(t.get("sample_mb", 2000), f"{W}.sample_mb"),
            "seed": int(t.get("seed", 0)),
        }}
        plan["tokenizer"]["model"] = os.path.join(plan["tokenizer"]["train"]["output"], "tokenizer.model")

    pp = raw.get("preprocess") or {}
    if not isinstance(pp, dict):
        raise PlanError(f"{P}: preprocess: must be a mapping")
    _check_keys(pp, ("workers", "append_eod", "dtype", "shards", "chunk_mb"), f"{P}: preprocess")
    if pp.get("dtype", "auto") not in ("auto", "uint16", "int32"):
        raise PlanError(f"{P}: preprocess.dtype: must be auto, uint16 or int32")
    if not isinstance(pp.get("append_eod", True), bool):
        raise PlanError(f"{P}: preprocess.append_eod: must be true or false")
    plan["preprocess"] = {
        "workers": int(_num(pp["workers"], f"{P}: preprocess.workers", integer=True)) if pp.get("workers") else 0,
        "append_eod": pp.get("append_eod", True),
        "dtype": pp.get("dtype", "auto"),
        "shards": _num(pp["shards"], f"{P}: preprocess.shards", integer=True) if pp.get("shards") else None,
        "chunk_mb": _num(pp.get("chunk_mb", 1), f"{P}: preprocess.chunk_mb"),
    }

    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise PlanError(f"{P}: stages: required, a mapping such as stage1: {{token_budget, sources}}")
    plan["stages"] = {}
    for sname, st in stages.items():
        W = f"{P}: stages.{sname}"
        if not isinstance(sname, str) or not STAGE_RE.match(sname):
            raise PlanError(f"{W}: stage names must be simple names (letters, digits, _ . -)")
        if not isinstance(st, dict):
            raise PlanError(f"{W}: must be a mapping with token_budget and sources")
        _check_keys(st, ("token_budget", "sources", "description", "kind", "chat_template", "seq_length",
                         "overlong", "dedup", "decontaminate"), W)
        kind = st.get("kind", "pretrain")
        if kind not in ("pretrain", "sft"):
            raise PlanError(f"{W}.kind: must be pretrain (documents) or sft (chat records), got {kind!r}")
        if kind != "sft":
            for k in ("chat_template", "seq_length", "overlong"):
                if k in st:
                    raise PlanError(f"{W}.{k}: only for kind: sft stages")
        elif st.get("dedup") or st.get("decontaminate"):
            raise PlanError(f"{W}: dedup / decontaminate are for pretraining stages (documents), not kind: sft")
        if "token_budget" not in st:
            raise PlanError(f"{W}.token_budget: required (tokens to train on in this stage)")
        budget = _num(st["token_budget"], f"{W}.token_budget", integer=True)
        srcs = st.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise PlanError(f"{W}.sources: required, a non-empty list")
        names = set()
        out_srcs = []
        for i, s in enumerate(srcs):
            SW = f"{W}.sources[{i}]"
            if not isinstance(s, dict):
                raise PlanError(f"{SW}: must be a mapping with name, globs, weight")
            _check_keys(s, ("name", "globs", "weight", "json_key", "format"), SW)
            # an sft source without a weight takes its share by conversation count (each conversation
            # once per epoch); pretraining sources always name theirs
            for req in ("name", "globs") + (() if kind == "sft" else ("weight",)):
                if req not in s:
                    raise PlanError(f"{SW}.{req}: required")
            name = s["name"]
            if not isinstance(name, str) or not STAGE_RE.match(name):
                raise PlanError(f"{SW}.name: must be a simple name (letters, digits, _ . -), got {name!r}")
            if name in names:
                raise PlanError(f"{SW}.name: duplicate source name {name!r} in stage {sname}")
            names.add(name)
            fmt = s.get("format", "auto")
            if fmt not in FORMATS:
                raise PlanError(f"{SW}.format: must be one of {', '.join(FORMATS)}")
            jk = s.get("json_key", "text")
            if not isinstance(jk, str) or not jk:
                raise PlanError(f"{SW}.json_key: must be a non-empty string")
            out_srcs.append({"name": name, "globs": _globs(s["globs"], f"{SW}.globs"),
                             "weight": _num(s["weight"], f"{SW}.weight") if "weight" in s else None,
                             "json_key": jk, "format": fmt,
                             "where": SW})
        plan["stages"][sname] = {"token_budget": budget, "sources": out_srcs, "kind": kind,
                                 "dedup": dedup.dedup_settings(st.get("dedup"), f"{W}.dedup", PlanError),
                                 "decontaminate": dedup.decontam_settings(st.get("decontaminate"), f"{W}.decontaminate",
                                                                          PlanError, _expand)}
        if kind == "sft":
            from .sft import stage_settings

            try:
                plan["stages"][sname]["sft"] = stage_settings(st, out_srcs, f"stages.{sname}")
            except DataPrepError as e:
                raise PlanError(f"{P}: {e}") from None
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


def _main(argv=None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m data_prep.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
