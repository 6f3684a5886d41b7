"""How much the sweep service's libraries print: quiet unless asked (``sweeps --verbose``).

Quiet means that Optuna's, MLflow's, Alembic's and Ray's INFO lines ("A new study created",
"Creating initial MLflow database tables", "Started a local Ray instance") and Ray's notice that
token authentication is on are not shown; their warnings and errors still are.
"""

from __future__ import annotations

import logging
import os

from .adapters.ray_adapter import TOKEN_NOTICE_LOGGER

_state = {"verbose": False}
# Loggers held at WARNING when quiet; the token-auth notice is a warning, so its logger at ERROR.
_QUIET_LEVELS = {
    "optuna": logging.WARNING,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "ray": logging.WARNING,
    TOKEN_NOTICE_LOGGER: logging.ERROR,
}


def configure(verbose: bool = False) -> None:
    """Set the third-party loggers for quiet (default) or verbose (INFO) output."""
    _state["verbose"] = verbose
    if not verbose:  # MLflow sets its loggers' level from this variable when it is imported (lazily, later)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name, level in _QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(logging.INFO if verbose else level)
    import optuna

    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def ray_logging_level() -> int:
    """The ``logging_level`` for ``ray.init`` (which would otherwise reset Ray's logger to INFO)."""
    return logging.INFO if _state["verbose"] else logging.WARNING


__all__ = ["configure", "ray_logging_level"]
