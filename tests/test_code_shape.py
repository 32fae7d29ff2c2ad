"""The library stays readable: short functions, and a training loop without deep nesting."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "scllm"
MAX_LINES = 80
KNOWN_LONG: set = set()  # none: split a function before it grows past MAX_LINES
BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.Try)


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def nesting(node: ast.AST, depth: int = 0) -> int:
    """Deepest block (for, while, if, with, try) nesting inside a function, not counting inner
    functions (they are measured on their own)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, nesting(child, depth + isinstance(child, BLOCKS)))
    return deepest


def test_no_library_function_is_longer_than_80_lines():
    long = {
        (str(path.relative_to(SRC)), f.name): f.end_lineno - f.lineno + 1
        for path in sorted(SRC.rglob("*.py"))
        for f in functions(path)
        if f.end_lineno - f.lineno + 1 > MAX_LINES
    }
    assert set(long) <= KNOWN_LONG, long


def test_training_loop_nests_at_most_three_blocks_deep():
    deep = {f.name: nesting(f) for f in functions(SRC / "train" / "loop.py") if nesting(f) > 3}
    assert not deep, deep


def test_nesting_counts_blocks():
    code = "def f(x):\n    for a in x:\n        if a:\n            with a:\n                pass\n"
    assert nesting(next(functions_of(code))) == 3


def functions_of(code: str):
    return (n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef))
