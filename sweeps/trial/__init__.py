"""One population of models, trained and measured: datasets and models (their registries and the
one place their names are resolved, :mod:`.catalog`), losses, training of K stacked members
(K = 1 the same path), the compiled step, checkpoints, and one trial's measures (:mod:`.run`).

Imports torch, ``landscape`` and the spec layer; nothing of Ray, Optuna or MLflow.
"""

from __future__ import annotations

from landscape._exports import lazy_exports

# ``sweeps.trial`` was the module of one trial (now :mod:`.run`); its public names stay here.
_EXPORTS = dict.fromkeys(
    ("TrialResult", "TrainedMember", "measure_batches", "measure_trained", "run_population", "run_trial")
    + ("write_artifacts",),
    ".run",
)
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
