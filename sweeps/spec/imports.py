"""Objects named by an import path in a config: ``"package.module:name"`` -> the object.

Used for custom model factories (``model.name: "mypkg.nets:build"``); a module of its own (it
imports nothing from ``sweeps``) so that the config schema and :mod:`sweeps.trial.models` do not import
each other.
"""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """``"package.module:name"`` -> the object (``ValueError`` naming what is missing)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:name' (got {path!r})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r}: {err}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


__all__ = ["import_object"]
