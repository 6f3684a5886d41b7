"""Module paths of ``sweeps`` 0.1 (a flat package), still importable: ``import sweeps.config`` gives
the module now at :mod:`sweeps.spec.config`, with a ``DeprecationWarning`` naming the new path.
The same module object is returned, so registries, classes and pickles made under either path agree.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old flat module -> where it lives now
MOVED = {
    **dict.fromkeys(("config", "config_text", "errors", "names", "imports", "status"), "spec"),
    **dict.fromkeys(
        ("data", "models", "losses", "train", "population", "compiled_step", "epochs", "checkpoint"), "trial"
    ),
    **dict.fromkeys(
        ("connections", "outages", "tracking", "search", "lease", "live", "progress", "batching", "worker", "logs")
        + ("plan", "submit"),
        "service",
    ),
    **dict.fromkeys(("queries", "report", "remeasure", "manifest", "connectivity"), "posthoc"),
    "figures": "analysis",
}
NEW_PATHS = {f"sweeps.{old}": f"sweeps.{layer}.{old}" for old, layer in MOVED.items()}
# ``sweeps.trial`` was a module and is the trial layer's package now: it exports ``run_trial`` and
# ``TrialResult`` as the module did (sweeps/trial/__init__.py).


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in NEW_PATHS:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = NEW_PATHS[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its new name; the import system has just set ``__spec__`` to the
        # old name's: give the module its own back.
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
