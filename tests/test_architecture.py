"""The shape of the code base (issue 22): one home per concern, no import cycles.

These read the source as text (Python's own parser), so they cost well under a second and hold for
every import, also those inside functions and under `if TYPE_CHECKING:`: a module that imports
another which imports it back is a cycle whether or not Python happens to tolerate it at run time.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("megafox", "data_prep", "checkpoints_tools")


def _modules() -> Dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imported_names(module: str, path: Path) -> List[str]:
    """Every dotted name `module` imports, relative imports resolved, at any depth of the file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> Dict[str, Set[str]]:
    mods = _modules()

    def owner(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in mods.items():
        targets = {owner(n) for n in _imported_names(module, path)}
        # a package's own submodules and its parents' __init__ are not edges back and forth
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_sees_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "megafox.training.loop" in graph and "data_prep.plan" in graph  # the walk saw the tree
    found = cycles(graph)
    lines = [" <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
             for c in found]
    assert not found, "import cycles:\n" + "\n".join(lines)


# Checkpoint logic has one home: megafox/checkpoint/ (and the CLIs of checkpoints_tools/ on top of it).
CHECKPOINT_HOMES = ("megafox.checkpoint", "checkpoints_tools")


def _in_checkpoint_home(module: str) -> bool:
    return any(module == home or module.startswith(home + ".") for home in CHECKPOINT_HOMES)
CHECKPOINT_MACHINERY = ("megatron.core.dist_checkpointing", "torch.distributed.checkpoint")


def test_checkpoint_machinery_is_used_only_by_the_checkpoint_package():
    graph_names = {m: _imported_names(m, p) for m, p in _modules().items()}
    outside = sorted({
        f"{module} imports {name.rpartition('.')[0] if name.count('.') > 3 else name}"
        for module, names in graph_names.items() if not _in_checkpoint_home(module)
        for name in names if name.startswith(CHECKPOINT_MACHINERY)
    })
    # megafox.compat patches dist_checkpointing's loaders to the safe ones; it holds no checkpoint logic
    outside = [line for line in outside if not line.startswith("megafox.compat")]
    assert not outside, "checkpoint machinery outside megafox/checkpoint:\n" + "\n".join(outside)
    assert (REPO / "megafox" / "checkpoint" / "__init__.py").is_file()
    stray = sorted(p.name for p in (REPO / "megafox").glob("checkpoint_*.py"))
    assert not stray, f"checkpoint modules outside the package: {stray}"


def test_the_installed_package_holds_no_fault_injector():
    """Fault injection lives on the tests' side; nothing the user installs can kill a run."""
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            assert "faults" not in path.stem, f"{path.relative_to(REPO)}: fault injectors belong in tests/"
            imported = _imported_names(".".join(path.relative_to(REPO).with_suffix("").parts), path)
            assert not [n for n in imported if n.startswith("tests")], f"{path}: the package imports the tests"


@pytest.mark.parametrize("module", ["data_prep.plan", "data_prep.preprocess", "data_prep.sft",
                                    "megafox.formats.blend", "megafox.formats.indexed"])
def test_data_prep_side_starts_without_the_training_stack(module):
    """data_prep (and the on-disk formats it writes) import neither torch nor megatron: a CPU-only
    preprocessing node starts in a fraction of a second and needs no GPU wheels."""
    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'megatron') if m in sys.modules); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
