"""Which code may import what (imports inside functions count; ``if TYPE_CHECKING:`` blocks do
not, they never run):

* ``landscape`` imports nothing of ``sweeps``, Ray, Optuna or MLflow (a notebook library);
* the driver's loop and its records (``sweeps.service.loop``, ``sweeps.service.records``) import
  none of Ray, Optuna or MLflow: they run on fake parts in tests/test_loop.py;
* the adapters (``sweeps.adapters``) import no other ``sweeps`` module: they wrap one library each.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE_LIBRARIES = {"ray", "optuna", "mlflow"}


def imported_roots(path: Path, *, relative_as: str | None = None) -> set[str]:
    """Top-level names of the modules ``path`` imports (relative imports as ``relative_as``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                found.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level and relative_as:
                    found.add(relative_as)
                elif not child.level and child.module:
                    found.add(child.module.split(".")[0])
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def test_landscape_imports_no_sweep_service():
    bad = {
        p.relative_to(ROOT).as_posix(): imported_roots(p) & (SERVICE_LIBRARIES | {"sweeps"})
        for p in (ROOT / "landscape").rglob("*.py")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_driver_loop_imports_no_library():
    for name in ("loop.py", "records.py"):
        path = ROOT / "sweeps" / "service" / name
        assert not imported_roots(path) & SERVICE_LIBRARIES, name


def test_adapters_import_no_other_sweeps_module():
    for path in (ROOT / "sweeps" / "adapters").glob("*.py"):
        assert "sweeps" not in imported_roots(path, relative_as="sweeps"), path.name


def test_the_walk_sees_imports():
    roots = imported_roots(ROOT / "sweeps" / "service" / "executor.py", relative_as="sweeps")
    assert "sweeps" in roots and "ray" in roots  # lazy `import ray` inside methods is seen
