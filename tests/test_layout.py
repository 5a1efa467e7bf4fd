"""The package's size rules (docs/ARCHITECTURE.md): no Python module over 500 lines, no function over 80 lines
unless its docstring says why (the word "long" in it)."""

import ast
from pathlib import Path

import diffinstruct

ROOTS = [Path(diffinstruct.__file__).parent]  # the ComfyUI side included (nodes/ is a link into it)
MAX_MODULE, MAX_FUNCTION = 500, 80


def _files():
    return [p for root in ROOTS if root.is_dir() for p in sorted(root.rglob("*.py"))]


def test_the_package_is_found():
    assert len(_files()) > 50


def test_modules_are_small():
    big = [f"{p}: {n}" for p in _files() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE]
    assert big == []


def test_functions_are_short_or_say_why():
    long = []
    for p in _files():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION and "long" not in (ast.get_docstring(node) or "").lower():
                    long.append(f"{p}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
