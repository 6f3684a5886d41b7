"""Sweep names: one safe path component each (:data:`NAME_RULE`), checked in one place."""

from __future__ import annotations

import re
from typing import Any

from .errors import UsageError

#: A sweep name is one safe path component: it names the Optuna study, the MLflow experiment and
#: the folders ``<results dir>/mlartifacts/<name>`` and ``<results dir>/reports/<name>``.
NAME_MAX_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
NAME_RULE = (
    f"letters, digits, '-', '_' and '.', not starting with '.', at most {NAME_MAX_LENGTH} "
    "characters (it becomes a folder name)"
)


def check_name(name: Any, field: str = "name") -> str:
    """``name`` if it is a safe sweep name (:data:`NAME_RULE`), else :class:`~sweeps.spec.errors.UsageError`
    (a ``ValueError``) naming ``field``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > NAME_MAX_LENGTH:
        shown = name if not isinstance(name, str) or len(name) <= 120 else name[:117] + "..."
        raise UsageError(f"{field}: must be {NAME_RULE} (got {shown!r})")
    return name
