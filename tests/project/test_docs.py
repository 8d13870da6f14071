"""The docs site's pages hold: every Python block runs, every signature is the code's.

Fenced blocks of ``docs/**/*.md`` are read by their info string:

* ```python: executed, each block on its own (fresh namespace, a temporary working
  directory); a block that raises fails its test.
* ```python signature: a PML-style signature (``losses.XxxLoss(a, b=1, **kwargs)``),
  compared with ``inspect.signature`` of the named ``pml_extras`` object: the same
  parameters, in order, of the same kinds, with the same defaults (value and type).
* ```python torchrun: the multi-GPU recipe in ``docs/distributed.md``, run on 2 gloo ranks
  by ``tests/distributed/test_distributed_recipe.py``; skipped here.

Any other tag after ``python`` is an error, so that no block escapes the tests unseen.
The navigation lists every page, relative links resolve, and the committed import graph
(``docs/img/import_graph.svg``) is the one ``docs/import_graph.py`` draws from today's tree.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

# The repository root, wherever under tests/ this file lives.
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```([^\s`]*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
KNOWN_PYTHON_TAGS = {"": "run", "signature": "signature", "torchrun": "torchrun"}


def _blocks(kind):
    """(test id, page, source) of every python block of the given kind."""
    found = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        count = 0
        for lang, tag, source in FENCE.findall(page.read_text()):
            if lang == "python" and KNOWN_PYTHON_TAGS.get(tag.strip()) == kind:
                found.append(pytest.param(page, source, id=f"{rel}[{count}]"))
                count += 1
    return found


RUN_BLOCKS = _blocks("run")
SIGNATURE_BLOCKS = _blocks("signature")


def test_docs_exist_with_python_blocks():
    assert len(PAGES) >= 15
    assert len(RUN_BLOCKS) >= 9  # one example per loss page at least
    assert len(SIGNATURE_BLOCKS) >= 7 + 14  # every loss and every public functional


def test_every_python_block_has_a_known_tag():
    for page in PAGES:
        for lang, tag, _ in FENCE.findall(page.read_text()):
            if lang != "python":
                continue
            assert tag.strip() in KNOWN_PYTHON_TAGS, (
                f"{page.relative_to(ROOT)}: ```python {tag} is neither run nor checked; "
                f"known tags: {sorted(KNOWN_PYTHON_TAGS)}"
            )
            if tag.strip() == "torchrun":
                assert page == DOCS / "distributed.md", (
                    f"{page}: only docs/distributed.md's recipe is run by torchrun"
                )


@pytest.mark.parametrize("page, source", RUN_BLOCKS)
def test_docs_python_block_runs(page, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict = {"__name__": "docs_block"}
    exec(compile(source, str(page), "exec"), namespace)


def _parameters(text: str):
    """(object path, [(name, kind, default)]) of a signature block's text."""
    match = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\((.*)\)\s*", text, flags=re.S)
    assert match, f"not a signature: {text!r}"
    target, args = match.groups()
    tree = ast.parse(f"def _({args}): pass").body[0].args
    params = []
    positional = tree.posonlyargs + tree.args
    defaults = [None] * (len(positional) - len(tree.defaults)) + list(tree.defaults)
    for arg, default in zip(positional, defaults):
        kind = "POSITIONAL_ONLY" if arg in tree.posonlyargs else "POSITIONAL_OR_KEYWORD"
        params.append((arg.arg, kind, default))
    if tree.vararg:
        params.append((tree.vararg.arg, "VAR_POSITIONAL", None))
    for arg, default in zip(tree.kwonlyargs, tree.kw_defaults):
        params.append((arg.arg, "KEYWORD_ONLY", default))
    if tree.kwarg:
        params.append((tree.kwarg.arg, "VAR_KEYWORD", None))
    return target, params


def _resolve(target: str):
    module_name, attr = f"pml_extras.{target}".rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attr)


@pytest.mark.parametrize("page, source", SIGNATURE_BLOCKS)
def test_docs_signature_is_the_codes(page, source):
    target, documented = _parameters(source)
    actual = list(inspect.signature(_resolve(target)).parameters.values())
    assert [p[0] for p in documented] == [p.name for p in actual], f"{target}: parameters"
    for (name, kind, default), param in zip(documented, actual):
        assert kind == param.kind.name, f"{target}({name}): {kind} vs {param.kind.name}"
        if param.default is inspect.Parameter.empty:
            assert default is None, f"{target}({name}) has no default in the code"
        else:
            assert default is not None, f"{target}({name}): the code's default is missing"
            value = ast.literal_eval(default)
            assert (type(value), value) == (type(param.default), param.default), (
                f"{target}({name}): documented default {value!r}, code {param.default!r}"
            )


def test_every_page_is_in_the_navigation():
    """Every page is reachable from the nav, and every nav entry is a page (mkdocs
    --strict only fails on the second)."""
    nav = set(re.findall(r":\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert nav == pages, f"not in the nav: {pages - nav}; missing pages: {nav - pages}"


@pytest.mark.parametrize("doc", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)}: broken link {target}"


def _import_graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", DOCS / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_drawing_is_current():
    """The committed drawing shows today's imports: after changing one, run
    ``python docs/import_graph.py`` (needs Graphviz) and commit docs/img/."""
    graph = _import_graph_module()
    edges = {(e.source, e.target) for e in graph.import_edges()}
    drawn = graph.svg_edges((DOCS / "img" / "import_graph.svg").read_text())
    assert drawn == edges, (
        f"docs/img/import_graph.svg is stale: drawn but gone {sorted(drawn - edges)}, "
        f"new {sorted(edges - drawn)}; rerun python docs/import_graph.py"
    )
    assert (DOCS / "img" / "import_graph.png").stat().st_size > 10_000


def test_import_graph_finds_circles_and_upward_arrows(tmp_path):
    """The drawing's parser on a tiny tree: a circle through a relative and a deferred
    import, an upward arrow from ops to losses, and a benchmark script importing its
    package; names outside the tree are ignored."""
    files = {
        "pml_extras/__init__.py": "from . import losses\n",
        "pml_extras/ops/__init__.py": "",
        "pml_extras/ops/a.py": "import torch\nfrom .b import x\n",
        "pml_extras/ops/b.py": "def f():\n    from pml_extras.ops import a\n",
        "pml_extras/ops/c.py": "from ..losses.l import L\n",
        "pml_extras/losses/__init__.py": "",
        "pml_extras/losses/l.py": "from ..ops import a\n",
        "benchmarks/tool.py": "from tool_bench.cli import main\n",
        "benchmarks/tool_bench/__init__.py": "",
        "benchmarks/tool_bench/cli.py": "from . import helpers\nimport numpy\n",
        "benchmarks/tool_bench/helpers.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = _import_graph_module()
    edges = graph.import_edges(tmp_path)
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {
        ("pml_extras", "pml_extras.losses"),
        ("pml_extras.ops.a", "pml_extras.ops.b"),
        ("pml_extras.ops.b", "pml_extras.ops.a"),
        ("pml_extras.ops.c", "pml_extras.losses.l"),
        ("pml_extras.losses.l", "pml_extras.ops.a"),
        ("benchmarks/tool.py", "tool_bench.cli"),
        ("tool_bench.cli", "tool_bench.helpers"),
    }
    assert {e.target for e in edges if e.deferred} == {"pml_extras.ops.a"}
    assert graph.circles(edges) == [["pml_extras.ops.a", "pml_extras.ops.b"]]
    assert [(e.source, e.target) for e in graph.upward(edges)] == [
        ("pml_extras.ops.c", "pml_extras.losses.l")
    ]


LOSS_PAGES = {
    "SparseCircleLoss": "sparse_circle_loss.md",
    "CurricularFaceLoss": "curricular_face_loss.md",
    "ArcFaceLoss": "arcface_loss.md",
    "CosFaceLoss": "cosface_loss.md",
    "CircleLoss": "circle_loss.md",
    "CenterLoss": "center_loss.md",
    "StandaloneCenterLoss": "standalone_center_loss.md",
}


def _part(text: str, heading: str) -> str:
    """The text under a PML-style bold heading (``**Default reducer**:``)."""
    start = text.index(f"**{heading}**:") + len(heading) + 5
    end = text.find("\n**", start)
    return text[start : end if end >= 0 else None]


def test_every_loss_has_a_page():
    from pml_extras import losses

    classes = {n for n in losses.__all__ if n[0].isupper()}
    assert classes == set(LOSS_PAGES)


@pytest.mark.parametrize("name", sorted(LOSS_PAGES))
def test_loss_page_follows_pml_format_and_the_code(name):
    """PML's sections in PML's order, and the default distance, default reducer and
    reducer input they state are the loss's own."""
    from pml_extras import losses

    text = (DOCS / "losses" / LOSS_PAGES[name]).read_text()
    assert text.startswith(f"# {name}\n")
    headings = ["Equation", "Parameters", "Default distance", "Default reducer", "Reducer input"]
    positions = [text.index(f"**{h}**:") for h in headings]
    assert positions == sorted(positions), f"{name}: sections out of PML's order"

    cls = getattr(losses, name)
    args = (10, 8) if "num_classes" in inspect.signature(cls).parameters else ()
    loss_fn = cls(*args)
    distance = re.search(r"^- `(\w+)\((.*?)\)`", _part(text, "Default distance"), flags=re.M)
    actual = loss_fn.get_default_distance()
    assert distance.group(1) == type(actual).__name__
    for key, value in re.findall(r"(\w+)=([^,]+)", distance.group(2)):
        assert getattr(actual, key) == ast.literal_eval(value), f"{name}: distance {key}"
    reducer = re.search(r"^- `(\w+)`", _part(text, "Default reducer"), flags=re.M).group(1)
    assert reducer == type(loss_fn.get_default_reducer()).__name__
    inputs = re.findall(r"^\* \*\*(\w+)\*\*:", _part(text, "Reducer input"), flags=re.M)
    assert inputs == loss_fn.sub_loss_names()


def test_import_graph_script_runs(tmp_path, monkeypatch, capsys):
    """The script's own paths, without Graphviz: --print lists edges and circles; drawing
    stops (exit 1, nothing written) when ``dot`` is missing; with a stand-in ``dot`` that
    echoes its input, both files get the DOT source, circle edges in red."""
    graph = _import_graph_module()
    monkeypatch.setattr(graph, "OUT", tmp_path / "img")
    assert graph.main(["--print"]) == 0
    printed = capsys.readouterr().out
    edges = graph.import_edges()
    assert all(f"{e.source} -> {e.target}" in printed for e in edges)
    assert printed.count("import circle:") == len(graph.circles(edges))

    monkeypatch.setattr(graph.shutil, "which", lambda name: None)
    assert graph.main([]) == 1
    assert not (tmp_path / "img").exists()

    fake_dot = tmp_path / "dot"
    fake_dot.write_text("#!/bin/sh\ncat\n")
    fake_dot.chmod(0o755)
    monkeypatch.setattr(graph.shutil, "which", lambda name: str(fake_dot))
    assert graph.main([]) == 0
    for fmt in ("svg", "png"):
        source = (tmp_path / "img" / f"import_graph.{fmt}").read_text()
        assert source == graph.to_dot(edges)
    on_circles = [
        e for e in edges if any({e.source, e.target} <= set(c) for c in graph.circles(edges))
    ]
    for e in on_circles:
        assert f'"{e.source}" -> "{e.target}" [color="#d62728"' in source
