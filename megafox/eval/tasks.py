"""Load lm_eval tasks offline, with their data from a staged directory or the HF datasets cache.

Each lm_eval task names a Hugging Face dataset (`dataset_path`, e.g. `allenai/ai2_arc`, and a
config `dataset_name`, e.g. `ARC-Challenge`). Offline:

* `data_dir` given: the task reads `<data_dir>/<dataset_path>/`, a copy of that dataset's HF repo
  (its data files and README.md, which names the configs), made on a machine with internet by
  `hf download <dataset_path> --repo-type dataset --local-dir <data_dir>/<dataset_path>`.
  `datasets.load_dataset` reads such a directory like the hub repo, config names included. The
  directories are checked before anything runs, so a missing one is one line naming the task and
  the path to fill.
* no `data_dir`: `datasets` looks in its cache (HF_DATASETS_CACHE / HF_HOME), filled by a
  `load_dataset` on a connected machine; downloads are off (`offline_environment`), so a dataset
  that is not there fails at once, named, instead of hanging on the network.

Tasks keep lm_eval's own configs (prompts, splits, metrics, filters); only `dataset_path` and
`num_fewshot` are overridden, through lm_eval's group mechanism for per-task overrides.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megafox.config import ConfigError
from megafox.eval.suites import TaskSpec

# `datasets` builders that read local files named by dataset_kwargs.data_files
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv", ".arrow", ".txt", ".json.gz", ".jsonl.gz", ".jsonl.zst")


class TaskDataError(ConfigError):
    """A task's data is missing or unreadable; the message names the task and what to put where."""


def offline_environment() -> None:
    """No network for datasets / the hub: call before `datasets` or `lm_eval` is imported."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_lm_eval() -> str:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("evaluation needs EleutherAI's lm-evaluation-harness: pip install 'megafox[eval]' "
                          "(or `make venv`, which installs it)") from None
    return lm_eval.__version__


@dataclass
class LoadedTask:
    spec: TaskSpec
    name: str  # the task / group name lm_eval reports under
    kind: str  # "task" | "group" | "tag"
    objects: List[Any]  # lm_eval Task / Group objects to evaluate
    leaves: List[str] = field(default_factory=list)  # the leaf task names
    datasets: List[str] = field(default_factory=list)  # where the data was read from


def task_manager(specs: Sequence[TaskSpec], include_paths: Sequence[str] = ()):
    """lm_eval's TaskManager over what `specs` need.

    Indexing lm_eval's whole registry parses ~14,000 YAML files (seconds to tens of seconds). A
    text search for the files that define the requested names is ~1 s, so only their directories
    are indexed, when that is provably the same: each name defined by exactly one file, and every
    group member / tag it refers to found there. Otherwise the whole registry is indexed."""
    from lm_eval.tasks import TaskManager

    for spec in specs:
        if spec.is_file and not Path(spec.name).is_file():
            raise ConfigError(f"task file {spec.name}: not found")
    extra = sorted({str(Path(s.name).parent) for s in specs if s.is_file}
                   | {str(Path(p).expanduser()) for p in include_paths})
    names = [s.name for s in specs if not s.is_file]
    if not names:
        return TaskManager(include_path=extra or None, include_defaults=False)
    narrowed = _defining_dirs(names)
    if narrowed is not None:
        tm = TaskManager(include_path=narrowed + extra, include_defaults=False)
        if all(_complete(tm, name, set()) for name in names):
            return tm
    return TaskManager(include_path=extra or None, include_defaults=True)


_DEFINES = re.compile(r"""^["']?(?:task|group)["']?\s*:\s*["']?([^\s"'#]+)["']?\s*(?:#.*)?$""", re.M)


def _defining_dirs(names: Sequence[str]) -> Optional[List[str]]:
    """The registry directories whose YAML files define `names`, or None when a name is defined
    by no file (a tag, a generated name) or by several (the full index decides which wins)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    wanted, found = set(names), {}
    for path in root.rglob("*.yaml"):
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        for match in _DEFINES.finditer(text):
            if match.group(1) in wanted:
                found.setdefault(match.group(1), set()).add(path)
    if set(found) != wanted or any(len(files) > 1 for files in found.values()):
        return None
    dirs = sorted({p.parent for files in found.values() for p in files})
    outermost = [d for d in dirs if not any(o != d and o in d.parents for o in dirs)]
    return [str(d) for d in outermost]


def _complete(tm, name: str, seen: set) -> bool:
    """`name` and everything it refers to (group members, tagged tasks) are in `tm`'s index."""
    from lm_eval.tasks._index import Kind

    if name in seen:
        return True
    seen.add(name)
    entry = tm.task_index.get(name)
    if entry is None:
        return False
    if entry.kind == Kind.TAG:
        return all(_complete(tm, t, seen) for t in entry.tags)
    if entry.kind == Kind.GROUP:
        members = entry.cfg.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            ref = member if isinstance(member, str) else (member.get("group") if isinstance(member, dict) else None)
            if isinstance(member, dict) and ref is None:
                ref = member.get("task") if member.get("task") in tm.task_index else None
            if ref is not None and not _complete(tm, ref, seen):
                return False
    return True


def resolve(tm, spec: TaskSpec) -> Dict[str, Any]:
    """The index entry behind `spec`: its name, kind and leaf task configs (no data read yet)."""
    from lm_eval.tasks._index import Kind

    name = spec.name
    if spec.is_file:
        try:
            cfg = yaml.load(Path(spec.name).read_text(), Loader=_TaskNameSafeLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"task file {spec.name}: invalid YAML ({exc})") from None
        name = cfg.get("task") or cfg.get("group")
        if not isinstance(name, str):
            raise ConfigError(f"task file {spec.name}: has no 'task' (or 'group') name")
    entry = tm.task_index.get(name)
    if entry is None:
        import difflib

        close = difflib.get_close_matches(name, tm.all_tasks, n=6, cutoff=0.75)
        hint = f"; similar: {', '.join(close)}" if close else " (`lm_eval ls tasks` lists them)"
        raise ConfigError(f"task {name!r}: not in lm_eval's task registry{hint}")
    kind = {Kind.GROUP: "group", Kind.TAG: "tag"}.get(entry.kind, "task")
    return {"name": name, "kind": kind, "leaves": _leaves(tm, name, set())}


def _leaves(tm, name: str, seen: set) -> List[Dict[str, Any]]:
    from lm_eval.tasks._index import Kind

    if name in seen:
        return []
    seen.add(name)
    entry = tm.task_index.get(name)
    if entry is None:
        return []
    if entry.kind == Kind.TAG:
        return [leaf for t in sorted(entry.tags) for leaf in _leaves(tm, t, seen)]
    if entry.kind == Kind.GROUP:
        out = []
        members = entry.cfg.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str):
                out += _leaves(tm, member, seen)
            elif isinstance(member, dict) and isinstance(member.get("group"), str) and member["group"] in tm.task_index:
                out += _leaves(tm, member["group"], seen)
            elif isinstance(member, dict) and isinstance(member.get("task"), str):
                if member["task"] in tm.task_index:
                    out += [dict(leaf, **{k: v for k, v in member.items() if k.startswith("dataset")})
                            for leaf in _leaves(tm, member["task"], seen)]
                else:
                    out.append(dict(member, task=f"{name}::{member['task']}"))
        return out
    return [dict(entry.cfg or {}, task=name)]


def data_overrides(spec: TaskSpec, resolved: Dict[str, Any], data_dir: Optional[str]) -> Dict[str, Any]:
    """`dataset_path` pointed at the staged copy under `data_dir`, after checking it is there."""
    name = resolved["name"]
    mapped: Dict[str, str] = {}
    for leaf in resolved["leaves"]:
        path = leaf.get("dataset_path")
        if path is None:
            continue  # a Python task that builds its own data
        if path in PACKAGED_BUILDERS:
            _check_data_files(name, leaf)
            continue
        if Path(str(path)).expanduser().is_absolute():
            local = Path(str(path)).expanduser()
        elif data_dir is None:
            continue  # the HF datasets cache
        else:
            local = Path(data_dir).expanduser() / str(path)
        if not _has_data(local):
            what = f"{leaf['task']} of {name}" if leaf["task"] != name else name
            raise TaskDataError(
                f"task {what}: dataset {path!r} not found: expected {local}/ holding a copy of the HF dataset repo "
                f"(on a machine with internet: hf download {path} --repo-type dataset --local-dir {local})")
        mapped[str(path)] = str(local)
    if not mapped:
        return {}
    if len(mapped) > 1:
        raise ConfigError(f"task {name}: its subtasks read different datasets ({', '.join(sorted(mapped))}); "
                          f"list the subtasks separately")
    return {"dataset_path": next(iter(mapped.values()))}


def _has_data(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    return any(p.name.endswith(DATA_SUFFIXES) for p in directory.rglob("*") if p.is_file())


def _check_data_files(task: str, leaf: Dict[str, Any]) -> None:
    files = (leaf.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return
    listed = files.values() if isinstance(files, dict) else [files]
    for entry in listed:
        for path in entry if isinstance(entry, list) else [entry]:
            if "*" not in str(path) and not Path(str(path)).expanduser().exists():
                raise TaskDataError(f"task {task}: data file {path} not found")


def load_tasks(tm, specs: Sequence[TaskSpec], data_dir: Optional[str] = None,
               announce=None) -> List[LoadedTask]:
    """Build every task (which reads its data); any missing data fails before a model is touched."""
    resolved = [(spec, resolve(tm, spec)) for spec in specs]
    overrides = [data_overrides(spec, r, data_dir) for spec, r in resolved]  # all checked before loading
    loaded = []
    for (spec, r), override in zip(resolved, overrides):
        if announce:
            announce(f"loading {r['name']} data" + (f" from {override['dataset_path']}" if override else ""))
        if spec.shots is not None:
            override = dict(override, num_fewshot=spec.shots)
        loaded.append(_load_one(tm, spec, r, override))
    return loaded


def _load_one(tm, spec: TaskSpec, r: Dict[str, Any], override: Dict[str, Any]) -> LoadedTask:
    name, kind = r["name"], r["kind"]
    if kind == "group":
        members = [{"group": name, **override}]
    elif kind == "tag":
        members = [{"task": leaf["task"], **override} for leaf in r["leaves"]]
    else:
        members = [{"task": name, **override}]
    try:
        built = tm.load({"group": f"megafox::{name}", "task": members})
    except Exception as exc:  # datasets' many ways to say "not here" (offline, missing config, bad file)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = override.get("dataset_path") or "the HF datasets cache"
        raise TaskDataError(f"task {name}: could not load its data from {where} ({type(exc).__name__}: "
                            f"{detail[:300]}); stage it as docs/evaluation.md shows and pass --data-dir") from None
    if kind == "group":
        objects = [built["groups"][name]]
    elif kind == "tag":
        objects = [built["tasks"][leaf["task"]] for leaf in r["leaves"]]
    else:
        objects = [built["tasks"][name]]
    leaves = sorted(built["tasks"])
    sources = sorted({str(t.config.dataset_path) for t in built["tasks"].values()})
    return LoadedTask(spec, name, kind, objects, leaves, sources)


class _TaskNameSafeLoader(yaml.SafeLoader):
    """Reads a task file's name only: its `!function` tags are left unresolved (None)."""


_TaskNameSafeLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
