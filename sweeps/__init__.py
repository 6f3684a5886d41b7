"""sweeps: distributed hyperparameter sweeps that measure the loss landscape of every model.

Ray runs the trials, Optuna chooses the points, MLflow records every run, pandas holds the
results. The package is in layers, each importing only those below it: :mod:`sweeps.spec` (the
config), :mod:`sweeps.trial` (training and measuring), :mod:`sweeps.analysis`,
:mod:`sweeps.service` (the driver and its parts; :mod:`sweeps.adapters` hold the libraries'
internals), :mod:`sweeps.posthoc` (results, report, re-measure, import), and the entry points
:mod:`sweeps.cli` and :mod:`sweeps.runner`. Public names are imported lazily so that ``import sweeps`` stays cheap (no Ray or
MLflow import until they are used).
"""

from __future__ import annotations

from landscape._exports import lazy_exports

from . import _moved
from .spec.catalog import NameCatalog, use_catalog

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SweepConfig": ".spec.config",
    "load_config": ".spec.config",
    "ConfigError": ".spec.errors",
    "run_trial": ".trial.run",
    "TrialResult": ".trial.run",
    "run_sweep": ".runner",
    "StoreUnavailableError": ".service.outages",
    "results": ".posthoc.queries",
    "correlations": ".analysis",
    "hyperparameter_effects": ".analysis",
    "complete_subgrid": ".analysis",
    "make_report": ".posthoc.report",
    "report_sweep": ".posthoc.report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def _name_catalog() -> NameCatalog:
    from .trial.catalog import CATALOG

    return CATALOG


# The package is in layers (docs/architecture.md): the spec checks dataset, model and metric names
# through the trial layer's registries, which are wired in here, below both, and loaded on first use.
use_catalog(_name_catalog)
_moved.install()
