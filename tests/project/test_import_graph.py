"""The import graph of ``pml_extras/`` and ``benchmarks/``: no circle, no upward arrow.

Issue 19: every import (top-level or inside a function: a lazy import is still a
dependency) is read with ``ast``, relative imports are resolved against the importing
module's package, and the strongly connected components of the graph must all be single
modules without a self-loop. The library's folders form layers, ops -> functional ->
losses -> distributed: a module may import its own layer or a lower one, never a higher
one.

What counts as an edge: ``import a.b`` and ``from a.b import c`` give an edge to module
``a.b.c`` when that is one of ours (a submodule), else to ``a.b``. Parent packages are
not edges (importing ``pml_extras.ops.dispatch`` runs ``pml_extras/__init__.py``, but
that is Python's package machinery, not a dependency the module chose). The benchmark
scripts put ``benchmarks/`` on ``sys.path``, so ``speed_bench.cli`` and
``benchmarks.speed_bench.cli`` name one module.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterable, List, Optional, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = ("ops", "functional", "losses", "distributed")  # lowest first


def module_files(top: str) -> Dict[str, str]:
    """{dotted module name: path} of the .py files under ``ROOT/top``."""
    out = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _aliases(modules: Iterable[str]) -> Dict[str, str]:
    """Every name a module is imported by -> its canonical name."""
    alias = {}
    for name in modules:
        alias[name] = name
        if name.startswith("benchmarks."):
            alias.setdefault(name[len("benchmarks.") :], name)
    return alias


def _resolve(name: str, alias: Dict[str, str]) -> Optional[str]:
    return alias.get(name)


def imports_of(module: str, path: str, alias: Dict[str, str], is_package: bool) -> Set[str]:
    """The modules of ours that ``module`` (at ``path``) imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    package = module if is_package else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name, alias)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                up = node.level - 1
                if up > len(parts):
                    raise ValueError(f"{path}: relative import beyond the top package")
                base = ".".join(parts[: len(parts) - up] if up else parts)
                if node.module:
                    base = f"{base}.{node.module}" if base else node.module
            else:
                base = node.module or ""
            for a in node.names:
                target = _resolve(f"{base}.{a.name}", alias) or _resolve(base, alias)
                if target:
                    found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    files = {**module_files("pml_extras"), **module_files("benchmarks")}
    alias = _aliases(files)
    graph = {}
    for name, path in files.items():
        is_package = path.endswith("__init__.py")
        graph[name] = imports_of(name, path, alias, is_package) - {None}
    return graph


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                out.append(sorted(component))
    return out


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    return [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]


def layer_of(module: str) -> Optional[int]:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "pml_extras" and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def upward_arrows(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for source, targets in sorted(graph.items()):
        low = layer_of(source)
        for target in sorted(targets):
            high = layer_of(target)
            if low is not None and high is not None and high > low:
                bad.append(f"{source} -> {target}")
    return bad


def test_graph_sees_the_imports_it_must():
    """The parser finds relative, lazy and benchmark-path imports (else the checks below
    could pass on an empty graph)."""
    graph = import_graph()
    assert "pml_extras.ops.dispatch" in graph["pml_extras.ops.class_lse"]  # from .x import
    assert "pml_extras.ops.kernel_check" in graph["pml_extras.ops.dispatch"]  # lazy import
    assert "pml_extras.ops.class_lse" in graph["pml_extras.functional.circle"]  # from ..ops
    assert "benchmarks.speed_bench.cli" in graph["benchmarks.speed"]  # via sys.path
    assert len(graph) > 60


def test_detectors_catch_a_circle_and_an_upward_arrow():
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a"},
        "d": {"d"},
        "e": set(),
        "pml_extras.ops.x": {"pml_extras.losses.y"},
        "pml_extras.losses.y": {"pml_extras.ops.z"},
        "pml_extras.ops.z": set(),
    }
    assert sorted(circles(graph)) == [["a", "b", "c"], ["d"]]
    assert upward_arrows(graph) == ["pml_extras.ops.x -> pml_extras.losses.y"]


@pytest.mark.parametrize("top", ["pml_extras", "benchmarks"])
def test_no_import_circle(top):
    found = [c for c in circles(import_graph()) if c[0].split(".")[0] == top]
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_upward_arrow_between_layers():
    bad = upward_arrows(import_graph())
    assert not bad, "a lower layer imports a higher one: " + "; ".join(bad)
