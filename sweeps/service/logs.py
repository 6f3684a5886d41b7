"""How much the sweep service's libraries print: quiet unless asked (``sweeps --verbose``).

Quiet means that Optuna's, MLflow's, Alembic's and Ray's INFO lines ("A new study created",
"Creating initial MLflow database tables", "Started a local Ray instance") and Ray's notice that
token authentication is on are not shown; their warnings and errors still are. Nor are MLflow's
"View run ... at: http://..." / "View experiment at: ..." lines, printed for every run it ends
against a tracking server: the CLI prints the sweep's own links once (:func:`sweeps.service.tracking.ui_links`).
"""

from __future__ import annotations

import logging
import os

from ..adapters.ray_adapter import TOKEN_NOTICE_LOGGER

_state = {"verbose": False}
# Loggers held at WARNING when quiet; the token-auth notice is a warning, so its logger at ERROR.
_QUIET_LEVELS = {
    "optuna": logging.WARNING,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "ray": logging.WARNING,
    TOKEN_NOTICE_LOGGER: logging.ERROR,
}


_MLFLOW_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def configure(verbose: bool = False) -> None:
    """Set the third-party loggers for quiet (default) or verbose (INFO) output."""
    _state["verbose"] = verbose
    if not verbose:  # MLflow sets its loggers' level from this variable when it is imported (lazily, later)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow reads this on every run it ends: printing the run's links is its default.
    os.environ[_MLFLOW_LINKS] = "false" if verbose else "true"
    for name, level in _QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(logging.INFO if verbose else level)
    import optuna

    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def ray_logging_level() -> int:
    """The ``logging_level`` for ``ray.init`` (which would otherwise reset Ray's logger to INFO)."""
    return logging.INFO if _state["verbose"] else logging.WARNING


__all__ = ["configure", "ray_logging_level"]
