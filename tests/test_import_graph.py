"""The library's modules import one another in one direction: no import circle inside
`adapttoken/`. The graph is read from the source with `ast`: every import statement counts, also
those inside functions, under `if TYPE_CHECKING:` and the relative ones, so a lazy import that
closes a circle fails this test as surely as a top-level one."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (dotted names rooted at the package's
    parent). `from pkg import mod` counts as importing pkg.mod where that is a module; importing
    pkg.sub.mod also imports the packages pkg.sub (their __init__ runs)."""
    root = package_dir.parent
    files = {module_name(p, root): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                # the module itself, or the nearest enclosing module of the package
                while t and t not in files:
                    t = t.rpartition(".")[0]
                while t:                            # pkg.sub.mod runs pkg.sub's __init__ too,
                    if t != name and not name.startswith(t + "."):   # not the packages that hold
                        deps.add(t)                                   # the importer (running)
                    t = t.rpartition(".")[0]
        graph[name] = deps
    return graph


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_detector_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")     # lazy, relative
    (pkg / "c.py").write_text("import pkg.a\n")                              # absolute
    (pkg / "d.py").write_text("from .a import x\n")                          # outside the circle
    assert find_circles(import_graph(pkg)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("import os\n")
    assert find_circles(import_graph(pkg)) == []


def test_no_import_circle_in_the_library():
    graph = import_graph(ROOT / "adapttoken")
    assert "adapttoken.decode" in graph and "adapttoken.models.loading" in graph
    assert find_circles(graph) == []


def test_the_method_never_imports_training():
    """training/ (synthetic videos, tiny models, the training script) serves the demo, the
    benchmarks and the tests; no step of the method depends on it."""
    graph = import_graph(ROOT / "adapttoken")
    users = ("adapttoken.training", "adapttoken.bench", "adapttoken.demo", "adapttoken.cli",
             "adapttoken.__main__")
    wrong = {m: sorted(d for d in deps if d.startswith("adapttoken.training"))
             for m, deps in graph.items() if not m.startswith(users)}
    assert {m: d for m, d in wrong.items() if d} == {}
