"""Draw the import graph of ``pml_extras/`` and ``benchmarks/`` for the docs.

    python docs/import_graph.py            # writes docs/img/import_graph.{svg,png}
    python docs/import_graph.py --print    # lists the edges, the circles, the upward arrows

Every ``import`` and ``from ... import`` of every module is read with :mod:`ast` (nothing
is imported or run), including imports inside functions (drawn dashed: they run later,
but the modules still depend on each other). Edges that lie on an import circle are red;
arrows that point up the library's layers (ops -> functional -> losses -> distributed,
all arrows pointing down) are orange.

Drawing needs Graphviz's ``dot`` (``apt-get install graphviz``); without it the script
stops and writes nothing, so the SVG and the PNG always come from the same run. CI does
not need ``dot``: ``tests/project/test_docs.py`` compares the committed SVG's edges with
:func:`import_edges` of the current tree, so a stale drawing fails the tests.

Module names: ``pml_extras.*`` as Python sees them; the benchmark packages as their
scripts import them (``benchmarks/`` is on ``sys.path``: ``retrieval_bench.cli``,
``speed_bench.timing``); a benchmark script by its path (``benchmarks/speed.py``).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
# Layers of the library, lowest first: an import may only point to the same or a lower one.
LAYERS = ("pml_extras.ops", "pml_extras.functional", "pml_extras.losses", "pml_extras.distributed")


class Module(NamedTuple):
    name: str  # dotted name, or the script's path for a benchmark script
    path: Path
    package: str  # the package its relative imports start from ("" for scripts)
    search: Tuple[str, ...]  # prefixes an absolute import may resolve under


class Edge(NamedTuple):
    source: str
    target: str
    deferred: bool  # the import runs inside a function, not at import time


def discover(root: Path = ROOT) -> Dict[str, Module]:
    """Every module of ``pml_extras/`` and ``benchmarks/``, keyed by its graph name."""
    modules: Dict[str, Module] = {}
    for path in sorted((root / "pml_extras").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        name = ".".join(parts)
        package = name if is_init else ".".join(parts[:-1])
        modules[name] = Module(name, path, package, ("",))
    bench = root / "benchmarks"
    for path in sorted(bench.rglob("*.py")):
        rel = path.relative_to(bench)
        if (bench / rel.parts[0] / "__init__.py").exists() and len(rel.parts) > 1:
            parts = list(rel.with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            if is_init:
                parts = parts[:-1]
            name = ".".join(parts)
            package = name if is_init else ".".join(parts[:-1])
            modules[name] = Module(name, path, package, ("",))
        else:
            # A script: its own folder and benchmarks/ are on sys.path when it runs.
            modules[path.relative_to(root).as_posix()] = Module(
                path.relative_to(root).as_posix(), path, "", ("",)
            )
    return modules


def _script_lookup(modules: Dict[str, Module]) -> Dict[Tuple[Path, str], str]:
    """(folder, bare name) -> graph name of the scripts, for ``import naive`` and the like."""
    return {(m.path.parent, m.path.stem): m.name for m in modules.values() if not m.package}


def _resolve(name: str, module: Module, modules, scripts, bench: Path) -> List[str]:
    """The graph modules an absolute import of ``name`` means (none if outside)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in modules and modules[candidate].package != "":
            return [candidate]
    for folder in (module.path.parent, bench):
        hit = scripts.get((folder, parts[0]))
        if hit is not None:
            return [hit]
    return []


def _is_deferred(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def import_edges(root: Path = ROOT) -> Set[Edge]:
    """Every import between modules of ``pml_extras/`` and ``benchmarks/``."""
    modules = discover(root)
    scripts = _script_lookup(modules)
    bench = root / "benchmarks"
    edges: Set[Edge] = set()
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets += _resolve(alias.name, module, modules, scripts, bench)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.package.split(".") if module.package else []
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                    # `from .x import y`: y is a submodule of x, or a name of x itself
                    # (x's __init__ runs either way, like a parent package's: not drawn).
                    subs = [f"{prefix}.{a.name}" for a in node.names]
                    targets += [s for s in subs if s in modules]
                    if not all(s in modules for s in subs) and prefix in modules:
                        targets.append(prefix)
                else:
                    subs = [f"{node.module}.{a.name}" for a in node.names]
                    targets += [s for s in subs if s in modules]
                    if not all(s in modules for s in subs):  # a name of the module itself
                        targets += _resolve(node.module, module, modules, scripts, bench)
            deferred = bool(targets) and _is_deferred(node, parents)
            for target in targets:
                if target != module.name:
                    edges.add(Edge(module.name, target, deferred))
    # An import at module level and one inside a function: keep the module-level one.
    eager = {(e.source, e.target) for e in edges if not e.deferred}
    return {e for e in edges if not e.deferred or (e.source, e.target) not in eager}


def circles(edges: Set[Edge]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    graph: Dict[str, List[str]] = defaultdict(list)
    for e in edges:
        graph[e.source].append(e.target)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {e.target for e in edges}):
        if node not in index:
            visit(node)
    return sorted(found)


def layer(name: str) -> int:
    """The library layer of a module (-1 outside the four layers)."""
    for i, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return -1


def upward(edges: Set[Edge]) -> List[Edge]:
    """Imports from a lower library layer into a higher one."""
    return sorted(e for e in edges if -1 < layer(e.source) < layer(e.target))


def cluster_of(name: str) -> str:
    if name.startswith("benchmarks/"):
        return str(Path(name).parent)
    if name.startswith("pml_extras"):
        parts = name.split(".")
        return "/".join(parts[:2]) if len(parts) > 2 or name in LAYERS else "pml_extras"
    return "benchmarks/" + name.split(".")[0]


def to_dot(edges: Set[Edge]) -> str:
    on_circle = {n for c in circles(edges) for n in c}
    up = set(upward(edges))
    modules = discover()
    nodes = sorted({e.source for e in edges} | {e.target for e in edges} | set(modules))
    clusters: Dict[str, List[str]] = defaultdict(list)
    for n in nodes:
        clusters[cluster_of(n)].append(n)
    lines = [
        "digraph imports {",
        '  graph [rankdir=LR, fontname="Helvetica", fontsize=11, nodesep=0.15, ranksep=0.6];',
        '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", fontname="Helvetica",'
        " fontsize=10, height=0.25];",
        '  edge [color="#777777", arrowsize=0.6];',
    ]
    for i, (cluster, members) in enumerate(sorted(clusters.items())):
        lines.append(f'  subgraph "cluster_{i}" {{')
        lines.append(f'    label="{cluster}/"; style="rounded"; color="#bbbbbb";')
        for n in members:
            label = n.rsplit("/", 1)[-1] if n.startswith("benchmarks/") else n.rsplit(".", 1)[-1]
            if modules[n].path.name == "__init__.py":
                label = "__init__"
            lines.append(f'    "{n}" [label="{label}"];')
        lines.append("  }")
    for e in sorted(edges):
        attrs = []
        if e.source in on_circle and e.target in on_circle and _same_circle(edges, e):
            attrs.append('color="#d62728", penwidth=1.6')
        elif e in up:
            attrs.append('color="#ff7f0e", penwidth=1.6')
        if e.deferred:
            attrs.append("style=dashed")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f'  "{e.source}" -> "{e.target}"{suffix};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _same_circle(edges: Set[Edge], edge: Edge) -> bool:
    return any(edge.source in c and edge.target in c for c in circles(edges))


def svg_edges(svg: str) -> Set[Tuple[str, str]]:
    """The (source, target) pairs drawn in an SVG that ``dot`` made from :func:`to_dot`."""
    import html
    import re

    titles = re.findall(r'<g id="edge\d+" class="edge">\s*<title>(.*?)</title>', svg)
    return {tuple(html.unescape(t).split("->", 1)) for t in titles}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="list edges, circles, upward arrows")
    args = parser.parse_args(argv)
    edges = import_edges()
    found, up = circles(edges), upward(edges)
    if args.print:
        for e in sorted(edges):
            print(f"{e.source} -> {e.target}{'  (in a function)' if e.deferred else ''}")
    for c in found:
        print("import circle:", " <-> ".join(c))
    for e in up:
        print(f"upward arrow: {e.source} -> {e.target}")
    if args.print:
        return 0
    dot = shutil.which("dot")
    if dot is None:
        print("Graphviz's `dot` is needed to draw (apt-get install graphviz)", file=sys.stderr)
        return 1
    source = to_dot(edges)
    OUT.mkdir(parents=True, exist_ok=True)
    for fmt in ("svg", "png"):
        out = subprocess.run(
            [dot, f"-T{fmt}", "-Gdpi=80"], input=source.encode(), capture_output=True, check=True
        ).stdout
        (OUT / f"import_graph.{fmt}").write_bytes(out)
        print(f"wrote {OUT / f'import_graph.{fmt}'} ({len(out) // 1024} KiB)")
    print(f"{len(edges)} imports, {len(found)} circles, {len(up)} upward arrows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
