"""The columns of a results DataFrame as the analysis reads them: outcome and bookkeeping
columns, seed columns, config columns (dotted keys and scalar top-level fields), measure columns
and the orientation (``larger_is``) of each measure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..spec.status import TrialStatus

#: Columns that describe a trial's outcome, never a measure.
OUTCOME_COLUMNS = ("test_acc", "train_acc", "gen_gap", "test_loss", "train_loss", "n_test", "n_train")
#: Bookkeeping columns of the results DataFrame.
BOOKKEEPING_COLUMNS = ("status", "run_id", "trial_number", "sweep")
CONVERGED = TrialStatus.CONVERGED


def default_seed_columns(df: pd.DataFrame) -> list[str]:
    """``"seed"`` and every column named ``"*.seed"`` or ``"*_seed"`` among the dotted config keys."""
    return [c for c in df.columns if c == "seed" or (is_dotted_key(c) and (c.endswith(".seed") or c.endswith("_seed")))]


def _top_level_config_keys() -> set[str]:
    """Scalar fields at the top of the sweep config (``name``, ``measure_subset``, ...), not sections."""
    try:
        from pydantic import BaseModel

        from ..spec.config import SweepConfig
    except ImportError:  # pragma: no cover - config module missing
        return set()
    return {
        name
        for name, info in SweepConfig.model_fields.items()
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
    }


#: Dotted names that are metrics, not config keys: in-training landscape values logged by the
#: sweep runner (``track.hessian_top_eig``) and metrics renamed on a clash with a param.
METRIC_PREFIXES = ("track.", "metric.")


def is_dotted_key(column: str) -> bool:
    """Whether ``column`` reads as a dotted config key: two or more identifiers joined by dots
    (``"train.lr"``, ``"search.space.train.lr"``). A metric whose name holds a number with a
    decimal point (``"steps_to_loss_0.1"``) is not one."""
    parts = column.split(".")
    return len(parts) > 1 and all(part.isidentifier() for part in parts)


def config_columns(df: pd.DataFrame) -> list[str]:
    """Config keys of a results DataFrame: dotted keys (:func:`is_dotted_key`: ``"train.lr"``,
    ``"model.width"``), ``"seed"`` and the other scalar top-level config fields; never dotted
    metrics (:data:`METRIC_PREFIXES`, ``"steps_to_loss_0.1"``)."""
    top = _top_level_config_keys() | {"seed"}
    return [
        c
        for c in df.columns
        if isinstance(c, str) and not c.startswith(METRIC_PREFIXES) and (is_dotted_key(c) or c in top)
    ]


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, np.ndarray)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if value is None or (not isinstance(value, (str, tuple)) and pd.isna(value)):
        return "None"
    return value


def _sorted_values(values: Iterable[Any]) -> list[Any]:
    values = list(dict.fromkeys(values))
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def measure_orientation(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """``larger_is`` of a measure column: the override, else ``landscape.METRICS``, else "neither".

    A column produced by a metric that returns several keys (``"hessian_spectrum_trace"`` from
    ``"hessian_spectrum"``) inherits that metric's orientation.
    """
    if overrides and name in overrides:
        value = overrides[name]
        if value not in ("sharper", "flatter", "neither"):
            raise ValueError(f"orientation[{name!r}]={value!r}: use 'sharper', 'flatter' or 'neither'")
        return value
    from landscape.metrics import metric_of_key

    metric = metric_of_key(name)
    return metric.larger_is if metric is not None else "neither"


def default_measures(df: pd.DataFrame) -> list[str]:
    """Numeric columns of ``df`` that a registered metric declares as a result key (``Metric.keys``)."""
    from landscape.metrics import metric_of_key

    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    return [c for c in numeric if metric_of_key(c) is not None]
