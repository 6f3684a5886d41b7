"""How well does each flatness measure predict generalization? Rank statistics over a sweep.

:func:`correlations` takes the results DataFrame of a sweep (one row per trial, see
:func:`sweeps.results`) and returns one row per measure with

* Kendall tau-b and Spearman rho against the target (default ``gen_gap``) and against
  ``test_acc`` (Kendall 1938/1945),
* the granulated Kendall coefficients ``psi[k]`` per hyperparameter and their mean ``Psi``
  (Jiang et al. 2020, "Fantastic generalization measures and where to find them"),
* the conditional-mutual-information score ``cmi`` (Jiang et al. 2020),
* the robust sign-error over environments (Dziugaite et al. 2020, "In search of robust
  measures of generalization"),
* percentile-bootstrap confidence intervals for tau and Psi.

Orientation: every measure is multiplied by ``sign`` (+1 when a larger value means a sharper
minimum, -1 when it means a flatter one, see ``landscape.METRICS[name].larger_is``) and the
target by +1 when larger is worse (``gen_gap``, errors, losses) or -1 when larger is better
(accuracies). So a positive tau/psi/Psi, and a sign-error below 0.5, mean "sharper => larger
generalization gap", which is what the flatness hypothesis predicts. ``tau_test_acc`` and
``spearman_test_acc`` compare the oriented measure with raw test accuracy: the hypothesis
predicts them negative.

Models: failed, diverged and not-converged trials are excluded (counted in ``.attrs``); the
runs of one configuration (same hyperparameters, different seeds) are averaged into one model
before tau, Spearman, psi and CMI. The robust sign-error uses the individual runs.

The package, one statistic per module (every name below is importable from ``sweeps.analysis``):

* :mod:`~sweeps.analysis.columns`: which columns of the results are config, seeds, measures,
  outcomes; each measure's orientation.
* :mod:`~sweeps.analysis.prepared`: :func:`prepare`, from the results DataFrame to models.
* :mod:`~sweeps.analysis.ranks`: Kendall tau-b, Spearman rho, percentile bootstrap intervals.
* :mod:`~sweeps.analysis.granulated`: psi_k and Psi.
* :mod:`~sweeps.analysis.mutual_information`: the CMI score.
* :mod:`~sweeps.analysis.sign_error`: the robust sign-error.
* :mod:`~sweeps.analysis.correlation_table`: :func:`correlations` and :func:`tau_table`.
* :mod:`~sweeps.analysis.effects`: :func:`hyperparameter_effects` and :func:`complete_subgrid`.
"""

from __future__ import annotations

# Settings are read in the module that defines them: patch sweeps.analysis.ranks.DENSE_PAIRS_MAX
# (or .prepared.MISSING_LISTED), not these re-exported copies.
from .columns import (
    BOOKKEEPING_COLUMNS,
    CONVERGED,
    METRIC_PREFIXES,
    OUTCOME_COLUMNS,
    config_columns,
    default_measures,
    default_seed_columns,
    measure_orientation,
)
from .correlation_table import (
    CONVENTION,
    IncompleteGridError,
    correlations,
    format_cells,
    tau_table,
    tau_with_interval,
)
from .effects import complete_subgrid, hyperparameter_effects
from .granulated import granulated_kendall
from .mutual_information import (
    _ordered_pair_table,  # noqa: F401 (tests check it against brute force)
    conditional_mutual_information,
    entropy_bits,
    mutual_information_bits,
)
from .prepared import MISSING_LISTED, PreparedSweep, prepare
from .ranks import DENSE_PAIRS_MAX, kendall_tau_b, pair_signs, percentile_interval, spearman
from .sign_error import hoeffding_weight, sign_error_environments

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "CONVENTION",
    "CONVERGED",
    "DENSE_PAIRS_MAX",
    "METRIC_PREFIXES",
    "MISSING_LISTED",
    "OUTCOME_COLUMNS",
    "IncompleteGridError",
    "PreparedSweep",
    "complete_subgrid",
    "conditional_mutual_information",
    "config_columns",
    "correlations",
    "default_measures",
    "default_seed_columns",
    "entropy_bits",
    "format_cells",
    "granulated_kendall",
    "hoeffding_weight",
    "hyperparameter_effects",
    "kendall_tau_b",
    "measure_orientation",
    "mutual_information_bits",
    "pair_signs",
    "percentile_interval",
    "prepare",
    "sign_error_environments",
    "spearman",
    "tau_table",
    "tau_with_interval",
]
