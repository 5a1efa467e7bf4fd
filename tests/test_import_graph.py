"""The package's import graph, read from the source: no cycles, and nothing imports the command line.

Every import counts, at module level or inside a function (a lazy import is still a dependency), except those in
`if TYPE_CHECKING:` blocks (never run) and in `if __name__ == "__main__":` blocks (a module run as a script, not
imported). The run layer's plugins (diffinstruct.run.plugins.PLUGINS) are imported by name, and count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python_shim" / "diffinstruct"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _skipped(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` and `if __name__ == "__main__":` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" in test or test.replace("'", '"') == '__name__ == "__main__"':
                out |= {id(n) for n in ast.walk(node)}
    return out


def imports_of(name: str) -> set[str]:
    """The package's modules that module `name` imports."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _skipped(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    if name == "diffinstruct.run.plugins":
        from diffinstruct.run.plugins import PLUGINS

        found.update(PLUGINS.values())
    return {m for m in found if m in MODULES and m != name}


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name) for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules in a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_imports():
    # a check that reads nothing passes everything: a few edges every layout of the package has
    edges = graph()
    assert "diffinstruct.run.parse" in edges["diffinstruct.run"]
    assert "diffinstruct.run.diffusers_problem" in edges["diffinstruct.run.plugins"]
    assert "diffinstruct.hosts.diffusers.adapters" in edges["diffinstruct.run.diffusers_problem"]
    assert "diffinstruct.cli" in edges["diffinstruct.__main__"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_nothing_imports_the_command_line():
    importers = sorted(name for name, deps in graph().items() if "diffinstruct.cli" in deps)
    # only the `python -m` entry points (diffinstruct, diffinstruct.comfyui) run the command line
    assert importers == ["diffinstruct.__main__", "diffinstruct.comfyui.__main__"]
