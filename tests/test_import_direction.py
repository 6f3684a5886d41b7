"""Which code may import what (imports inside functions count; ``if TYPE_CHECKING:`` blocks do
not, they never run):

* ``landscape`` imports nothing of ``sweeps``, Ray, Optuna or MLflow (a notebook library);
* the driver's loop and its records (``sweeps.service.loop``, ``sweeps.service.records``) import
  none of Ray, Optuna or MLflow: they run on fake parts in tests/test_loop.py;
* the adapters (``sweeps.adapters``) import no other ``sweeps`` module: they wrap one library each;
* ``sweeps`` is in layers (:data:`LAYERS`), each importing only the layers it lists; the entry points
  (``sweeps.cli``, ``sweeps.runner``, the package root) may import any;
* no import cycle inside ``sweeps``, and every module imports first in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE_LIBRARIES = {"ray", "optuna", "mlflow"}
SWEEPS = ROOT / "sweeps"

#: layer -> the layers its modules may import (itself included); lowest first
LAYERS = {
    "spec": {"spec"},
    "trial": {"spec", "trial"},
    "analysis": {"spec", "analysis"},
    "adapters": {"adapters"},
    "service": {"spec", "trial", "analysis", "adapters", "service"},
    "posthoc": {"spec", "trial", "analysis", "adapters", "service", "posthoc"},
}
ENTRY_POINTS = {"sweeps", "sweeps.cli", "sweeps.runner", "sweeps.exit_codes", "sweeps._moved"}


def python_prints(script: str) -> str:
    """What ``script`` prints, run in a fresh interpreter from the repository root (it must succeed)."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def import_statements(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``path``, module level or inside a function, except those under
    ``if TYPE_CHECKING:``, which never run."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def imported_roots(path: Path, *, relative_as: str | None = None) -> set[str]:
    """Top-level names of the modules ``path`` imports (relative imports as ``relative_as``)."""
    found: set[str] = set()
    for node in import_statements(path):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif node.level and relative_as:
            found.add(relative_as)
        elif not node.level and node.module:
            found.add(node.module.split(".")[0])
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


# --- the import graph of sweeps ------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(SWEEPS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sweeps_imports(path: Path) -> set[str]:
    """The ``sweeps`` modules that ``path`` imports (:func:`import_statements`), by full name."""
    package = _module_name(path) if path.stem == "__init__" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in import_statements(path):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sweeps")
            continue
        base = package.rsplit(".", node.level - 1)[0] if node.level else (node.module or "")
        if node.level and node.module:
            base = f"{base}.{node.module}"
        if base == "sweeps":  # `from . import data` / `from sweeps import x`
            found.update(f"sweeps.{a.name}" for a in node.names)
        elif base.split(".")[0] == "sweeps":  # a package's submodules count too
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_no_import_cycle_in_sweeps():
    """The import graph of ``sweeps/**/*.py`` is acyclic. Imports inside functions count: a lazy
    import still ties two modules together."""
    modules = {_module_name(p): p for p in sorted(SWEEPS.rglob("*.py"))}
    graph = {name: sorted(_sweeps_imports(path) & set(modules) - {name}) for name, path in modules.items()}
    assert graph["sweeps.spec.config"], "the walk found no imports: it is broken, not the graph acyclic"
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"

    def walk(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for dep in graph[name]:
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, stack + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            walk(name, [])


def test_every_sweeps_module_imports_first():
    """Each ``sweeps`` module imports in a fresh interpreter with no other ``sweeps`` module
    loaded before it (one interpreter; every ``sweeps`` module is dropped from ``sys.modules``
    before the next, third-party packages stay loaded to keep this fast)."""
    names = sorted(_module_name(p) for p in SWEEPS.rglob("*.py"))
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sweeps' or m.startswith('sweeps.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        print(f'{name}: {type(err).__name__}: {err}')\n"
    )
    printed = python_prints(script)
    assert printed == "", printed


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer_or_an_entry_point():
    stray = [
        name for name in map(_module_name, SWEEPS.rglob("*.py")) if _layer(name) is None and name not in ENTRY_POINTS
    ]
    assert not stray, f"put these in a layer ({', '.join(LAYERS)}) or list them as entry points: {stray}"


def test_each_layer_imports_only_the_layers_below_it():
    """Lazy imports count (``sweeps.spec`` checks names through a catalog the package root installs,
    never by importing the trial layer)."""
    wrong = []
    for path in sorted(SWEEPS.rglob("*.py")):
        name = _module_name(path)
        layer = _layer(name)
        if layer is None:
            continue
        for dep in sorted(_sweeps_imports(path)):
            if dep != "sweeps" and _layer(dep) not in LAYERS[layer]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the layers: " + "; ".join(wrong)


def test_the_layer_walk_sees_lazy_imports():
    deps = _sweeps_imports(SWEEPS / "posthoc" / "remeasure.py")
    assert "sweeps.service.cluster" in deps  # imported inside a function


def test_the_spec_imports_no_torch():
    """Loading and checking a config (names included, through the catalog) needs no torch until a
    name is checked; the schema alone imports only pydantic and yaml."""
    script = (
        "import sys\n"
        "from sweeps.spec.config import SweepConfig\n"
        "from sweeps.spec.catalog import use_catalog\n"
        "use_catalog(None)\n"
        "SweepConfig.model_validate({'name': 'x'})\n"
        "print(sorted(m for m in ('torch', 'ray', 'optuna', 'mlflow', 'pandas') if m in sys.modules))\n"
    )
    assert python_prints(script).strip() == "[]"


def test_every_module_path_of_version_0_1_still_imports():
    """``sweeps.config`` and the other flat module paths of 0.1 give the moved module itself (same
    object, so registries and pickles agree), with a DeprecationWarning naming the new path."""
    script = (
        "import importlib, sys, warnings\n"
        "from sweeps._moved import NEW_PATHS\n"
        "for old, new in NEW_PATHS.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    assert module is importlib.import_module(new), old\n"
        "    assert module.__spec__.name == new, (old, module.__spec__.name)\n"
        "    assert any(new in str(w.message) and w.category is DeprecationWarning for w in caught), old\n"
        "from sweeps.trial import run_trial, run_population, measure_batches, TrialResult, TrainedMember\n"
        "from sweeps.data import register_dataset\n"
        "from sweeps.trial.data import register_dataset as same\n"
        "assert register_dataset is same\n"
        "print(len(NEW_PATHS))\n"
    )
    printed = python_prints(script)
    moved = {_module_name(p) for p in SWEEPS.rglob("*.py")}
    from sweeps._moved import NEW_PATHS

    assert set(NEW_PATHS.values()) <= moved and int(printed) == len(NEW_PATHS) > 30
