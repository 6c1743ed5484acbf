"""The project's import graph, read from the source (nothing is imported): no module imports
itself through others, wherever in it the import sits (a deferred import inside a function is
a circle all the same), `protocols/` imports neither torch nor Ray, and `models/` imports no Ray."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "deployments", "protocols", "models", "bench", "training", "examples")


def modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` (at `path`) imports anywhere in its body, and the external
    top-level packages it imports, as `ext:<name>`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def add(target: str) -> None:
        if target.split(".")[0] not in PACKAGES:
            out.add(f"ext:{target.split('.')[0]}")
            return
        while target and target not in known:  # `a.b.C`: the module is `a.b`
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w.startswith("ext:"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_relative_and_deferred_imports():
    edges = graph()
    assert "deployments.config" in edges["deployments.app"]  # `from .config import ...`
    assert "deployments.pool" in edges["deployments.app"]
    assert "ext:ray" in edges["deployments.app"]


def test_no_module_imports_itself_through_others():
    assert cycles(graph()) == []


def test_a_made_up_circle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "ext:ray"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_protocols_import_neither_torch_nor_ray_and_models_no_ray():
    edges = graph()
    for name, targets in edges.items():
        if name.split(".")[0] == "protocols":
            assert not targets & {"ext:torch", "ext:ray"}, name
            assert all(t.startswith(("ext:", "protocols")) for t in targets), (name, targets)
        if name.split(".")[0] == "models":
            assert "ext:ray" not in targets, name
