"""The house rule on size: no module of ``sweeps/`` or ``landscape/`` (subpackages included) over
600 lines, no class over 250 lines (``end_lineno - lineno + 1`` of its ``ast.ClassDef``, decorators
not counted). A module that breaks it is split by what it holds, one idea per module.

There are no exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sweeps", "landscape")
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _classes(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, size in lines)`` of every class, nested ones included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                found.append((prefix + child.name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def test_the_walk_finds_the_modules():
    names = {_name(p) for p in _modules()}
    assert {"sweeps/runner.py", "landscape/surface.py", "sweeps/analysis/__init__.py"} <= names, sorted(names)


def test_no_module_over_600_lines():
    too_long = [f"{_name(p)}: {n} lines" for p in _modules() if (n := _lines(p)) > MAX_MODULE_LINES]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by what they hold): " + "; ".join(too_long)


def test_no_class_over_250_lines():
    too_long = [
        f"{_name(p)}:{line} class {name}: {size} lines"
        for p in _modules()
        for name, line, size in _classes(p)
        if size > MAX_CLASS_LINES
    ]
    assert not too_long, f"classes over {MAX_CLASS_LINES} lines: " + "; ".join(too_long)
