"""sweeps: distributed hyperparameter sweeps that measure the loss landscape of every model.

Ray runs the trials, Optuna chooses the points, MLflow records every run, pandas holds the
results. Public names are imported lazily so that ``import sweeps`` stays cheap (no Ray or
MLflow import until they are used).
"""

from __future__ import annotations

from landscape._exports import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SweepConfig": ".config",
    "load_config": ".config",
    "ConfigError": ".errors",
    "run_trial": ".trial",
    "TrialResult": ".trial",
    "run_sweep": ".runner",
    "StoreUnavailableError": ".outages",
    "results": ".queries",
    "correlations": ".analysis",
    "hyperparameter_effects": ".analysis",
    "complete_subgrid": ".analysis",
    "make_report": ".report",
    "report_sweep": ".report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
