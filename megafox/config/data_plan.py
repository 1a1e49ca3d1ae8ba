"""The data plan's schema (configs/data/*.yaml): tokenizer, preprocessing settings and the
curriculum's stages with their sources, typed and read through the same generic loader as the
training config. `data_prep.plan.load_plan` runs it and adds what data_prep itself owns (the
stages' dedup / decontaminate settings and the sft stages' chat-template checks).

Plan semantics users rely on:
- `${VAR}` / `$VAR` and `~` are expanded in paths and globs; `${PYTHON_STDLIB}` defaults to this
  Python's standard library directory.
- Relative paths (tokenizer model/output, output_dir) are relative to the current directory;
  globs are kept as written (data_prep expands them when it reads the files).
- Numbers may be written as YAML numbers or strings (`2e9`); whole numbers where counts are meant.
- Unknown keys are errors that list the allowed ones; every error names the file and the field.
"""
from __future__ import annotations

import os
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

from .loader import ConfigError, Wording, check_keys, check_types, from_dict, keys_of, load_yaml

SourceFormat = Literal["auto", "jsonl", "parquet", "text"]  # data_prep.common.FORMATS
TokenDtype = Literal["auto", "uint16", "int32"]
PlanKind = Literal["pretrain", "sft"]

# stage and source names become directory and file names
SIMPLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

PLAN_WORDING = Wording(not_found="{path}: plan file not found",
                       invalid_yaml="{path}: not valid YAML ({first_line})",
                       not_a_mapping="{path}: expected a mapping at the top level",
                       unknown_fields="{where}: unknown field(s) {unknown} (allowed: {allowed})")


def expand_vars(s: str) -> str:
    """`${VAR}`, `$VAR` and `~` expanded; an unset variable stays as written."""
    env = dict(os.environ)
    env.setdefault("PYTHON_STDLIB", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), s))


# ----------------------------------------------------------------------------------------------
# Field checks (the loader's `check` metadata): the plan's own wording for numbers, globs, names.

def number(v, where: str, positive: bool = True, integer: bool = False):
    """A YAML number or a numeric string; > 0 unless `positive` is false; whole if `integer`."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{where}: must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: must be a number, got {v!r}")
    if positive and not v > 0:
        raise ConfigError(f"{where}: must be > 0, got {v!r}")
    if integer:
        if float(v) != int(v):
            raise ConfigError(f"{where}: must be a whole number, got {v!r}")
        v = int(v)
    return v


def globs(v, where: str) -> List[str]:
    """One glob or a non-empty list of them, variables expanded."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{where}: must be a glob or a non-empty list of globs")
    return [expand_vars(x) for x in v]


def _count(v, where: str):
    return number(v, where, integer=True)


def _optional_count(v, where: str):  # absent, null or 0: unset
    return number(v, where, integer=True) if v else None


def _seed(v, where: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: must be an integer, got {v!r}") from None


def _choice(choices, message: str) -> Callable[[Any, str], Any]:
    def check(v, where: str):
        if v not in choices:
            raise ConfigError(f"{where}: {message.format(value=v)}")
        return v
    return check


def _flag(v, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: must be true or false")
    return v


def _simple_name(v, where: str) -> str:
    if not isinstance(v, str) or not SIMPLE_NAME.match(v):
        raise ConfigError(f"{where}: must be a simple name (letters, digits, _ . -), got {v!r}")
    return v


def _key(v, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: must be a non-empty string")
    return v


_FORMAT = _choice(("auto", "jsonl", "parquet", "text"), "must be one of auto, jsonl, parquet, text")
_KIND = _choice(("pretrain", "sft"), "must be pretrain (documents) or sft (chat records), got {value!r}")


# ----------------------------------------------------------------------------------------------
# The schema

@dataclass(kw_only=True)
class TokenizerTrain:
    """`tokenizer.train`: a SentencePiece model trained on a sample of the inputs (data_prep.train_tokenizer)."""

    inputs: List[str] = field(metadata={"required": "", "check": globs})
    vocab_size: int = field(default=256000, metadata={"check": _count})
    output: Optional[str] = field(default=None, metadata={"check": lambda v, where: str(v) if v else None})
    json_key: str = field(default="text", metadata={"check": lambda v, where: str(v)})
    format: SourceFormat = field(default="auto", metadata={"check": _FORMAT})
    sample_mb: float = field(default=2000, metadata={"check": number})
    seed: int = field(default=0, metadata={"check": _seed})


@dataclass(kw_only=True)
class PlanTokenizer:
    """Exactly one of `model` (an existing SentencePiece .model) and `train`."""

    model: Optional[str] = None
    train: Optional[TokenizerTrain] = None


@dataclass(kw_only=True)
class PreprocessSettings:
    """`preprocess:`, for every stage (workers 0: all cores; shards null: one per input file)."""

    workers: int = field(default=0, metadata={"check": lambda v, where: _optional_count(v, where) or 0})
    append_eod: bool = field(default=True, metadata={"check": _flag})
    dtype: TokenDtype = field(default="auto", metadata={"check": _choice(("auto", "uint16", "int32"),
                                                                          "must be auto, uint16 or int32")})
    shards: Optional[int] = field(default=None, metadata={"check": _optional_count})
    chunk_mb: float = field(default=1, metadata={"check": number})


@dataclass(kw_only=True)
class PlanSource:
    """One input of a stage: files (globs), its share of the stage's tokens, how to read it."""

    name: str = field(metadata={"required": "", "check": _simple_name})
    globs: List[str] = field(metadata={"required": "", "check": globs})
    # an sft source without a weight takes its share by conversation count (each conversation
    # once per epoch); pretraining sources always name theirs
    weight: Optional[float] = field(default=None, metadata={"check": lambda v, where: None if v is None else number(v, where)})
    json_key: str = field(default="text", metadata={"check": _key})
    format: SourceFormat = field(default="auto", metadata={"check": _FORMAT})
    where: str = field(default="", metadata={"derived": True})  # "<plan>: stages.<stage>.sources[<i>]", for messages


@dataclass(kw_only=True)
class PlanStage:
    """One curriculum stage: its token budget and sources -> one output set and one blend.json."""

    token_budget: int = field(metadata={"required": " (tokens to train on in this stage)", "check": _count})
    sources: List[PlanSource]  # read one by one (_read_stage)
    description: Any = None
    kind: PlanKind = field(default="pretrain", metadata={"check": _KIND})
    # kind: sft only; checked by data_prep (the chat template is data_prep's)
    chat_template: Any = None
    seq_length: Any = None
    overlong: Any = None
    # pretraining stages only; settings checked by data_prep.dedup
    dedup: Any = None
    decontaminate: Any = None

    # the sft keys the YAML gave, also when given as null (data_prep tells `chat_template: null`
    # from an absent one)
    sft_given: Tuple[str, ...] = field(default=(), metadata={"derived": True})

    SFT_ONLY = ("chat_template", "seq_length", "overlong")

    def sft_fields(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.sft_given}


@dataclass(kw_only=True)
class DataPlan:
    """A whole plan file (keyword-only: the YAML's order, defaults and required keys mixed)."""

    output_dir: str = "data"  # absolute once read
    tokenizer: PlanTokenizer
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    stages: Dict[str, PlanStage]
    name: Any = None
    description: Any = None
    path: str = field(default="", metadata={"derived": True})  # the plan file, absolute

    def as_dict(self) -> Dict[str, Any]:
        """The plain mapping data_prep's stages run on (and whose dedup settings blend.json records)."""
        tok = self.tokenizer
        tokenizer = {"model": tok.model} if tok.train is None else {"train": asdict(tok.train), "model": tok.model}
        return {
            "path": self.path, "output_dir": self.output_dir, "tokenizer": tokenizer,
            "preprocess": asdict(self.preprocess),
            "stages": {name: {"token_budget": st.token_budget, "sources": [asdict(s) for s in st.sources],
                              "kind": st.kind, "dedup": st.dedup, "decontaminate": st.decontaminate}
                       for name, st in self.stages.items()},
        }


# ----------------------------------------------------------------------------------------------
# Reading

def _read_tokenizer(tok, P: str, out_dir: str) -> PlanTokenizer:
    if not isinstance(tok, dict):
        raise ConfigError(f"{P}: tokenizer: required, with either 'model' or 'train'")
    check_keys(tok, keys_of(PlanTokenizer), f"{P}: tokenizer", PLAN_WORDING)
    if ("model" in tok) == ("train" in tok):
        raise ConfigError(f"{P}: tokenizer: give exactly one of 'model' (existing .model) or 'train'")
    if "model" in tok:
        if not isinstance(tok["model"], str) or not tok["model"]:
            raise ConfigError(f"{P}: tokenizer.model: must be a path to a SentencePiece .model")
        return PlanTokenizer(model=os.path.abspath(expand_vars(tok["model"])))
    W = f"{P}: tokenizer.train"
    if not isinstance(tok["train"], dict):
        raise ConfigError(f"{W}: must be a mapping with inputs, vocab_size, output")
    train = check_types(from_dict(TokenizerTrain, tok["train"], W, PLAN_WORDING), W)
    train.output = os.path.abspath(expand_vars(train.output or os.path.join(out_dir, "tokenizer")))
    return PlanTokenizer(train=train, model=os.path.join(train.output, "tokenizer.model"))


def _read_stage(sname, st, P: str) -> PlanStage:
    W = f"{P}: stages.{sname}"
    if not isinstance(sname, str) or not SIMPLE_NAME.match(sname):
        raise ConfigError(f"{W}: stage names must be simple names (letters, digits, _ . -)")
    if not isinstance(st, dict):
        raise ConfigError(f"{W}: must be a mapping with token_budget and sources")
    check_keys(st, keys_of(PlanStage), W, PLAN_WORDING)
    kind = _KIND(st.get("kind", "pretrain"), f"{W}.kind")  # first: which keys belong depends on it
    if kind != "sft":
        for k in PlanStage.SFT_ONLY:
            if k in st:
                raise ConfigError(f"{W}.{k}: only for kind: sft stages")
    elif st.get("dedup") or st.get("decontaminate"):
        raise ConfigError(f"{W}: dedup / decontaminate are for pretraining stages (documents), not kind: sft")
    srcs = st.get("sources")
    stage = check_types(from_dict(PlanStage, {**st, "sources": []}, W, PLAN_WORDING), W)
    stage.sft_given = tuple(k for k in PlanStage.SFT_ONLY if k in st)
    if not isinstance(srcs, list) or not srcs:
        raise ConfigError(f"{W}.sources: required, a non-empty list")
    names = set()
    for i, s in enumerate(srcs):
        SW = f"{W}.sources[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{SW}: must be a mapping with name, globs, weight")
        source = from_dict(PlanSource, s, SW, PLAN_WORDING)
        if kind != "sft" and "weight" not in s:
            raise ConfigError(f"{SW}.weight: required")
        if "weight" in s and s["weight"] is None:  # given, then a number
            raise ConfigError(f"{SW}.weight: must be a number, got None")
        check_types(source, SW)
        if source.name in names:
            raise ConfigError(f"{SW}.name: duplicate source name {source.name!r} in stage {sname}")
        names.add(source.name)
        source.where = SW
        stage.sources.append(source)
    return stage


def read_plan(path: str, output_dir: Optional[str] = None) -> DataPlan:
    """Read and check a data plan; `output_dir` (the command line's) wins over the plan's own.
    Errors are ConfigErrors that name the file and the field."""
    raw = load_yaml(path, PLAN_WORDING)
    P = path
    check_keys(raw, keys_of(DataPlan), P, PLAN_WORDING)
    out_dir = os.path.abspath(expand_vars(output_dir or str(raw.get("output_dir") or "data")))
    tokenizer = _read_tokenizer(raw.get("tokenizer"), P, out_dir)
    pp = raw.get("preprocess") or {}
    if not isinstance(pp, dict):
        raise ConfigError(f"{P}: preprocess: must be a mapping")
    preprocess = check_types(from_dict(PreprocessSettings, pp, f"{P}: preprocess", PLAN_WORDING), f"{P}: preprocess")
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{P}: stages: required, a mapping such as stage1: {{token_budget, sources}}")
    return DataPlan(output_dir=out_dir, tokenizer=tokenizer, preprocess=preprocess,
                    stages={sname: _read_stage(sname, st, P) for sname, st in stages.items()},
                    name=raw.get("name"), description=raw.get("description"), path=os.path.abspath(path))
