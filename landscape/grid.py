"""Grid coordinates shared by surfaces and interpolations: centered grids, one value or a pair
``(alpha, beta)`` per axis, and the tolerance for comparing a coordinate with a boundary."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

_BOUNDARY_TOL = 1e-9


def centered_grid(span: float, steps: int, argument: str = "span") -> np.ndarray:
    """``steps`` evenly spaced coordinates on ``[-span, span]``; with odd ``steps`` the middle
    one is exactly 0 (so the middle grid point is the model itself)."""
    if int(steps) != steps or steps < 2:
        raise ValueError(f"steps: must be an integer >= 2 (got {steps!r})")
    if not (isinstance(span, numbers.Real) and math.isfinite(span) and span > 0):
        raise ValueError(f"{argument}: must be a positive finite number (got {span!r})")
    half = (int(steps) - 1) / 2
    return float(span) * (np.arange(int(steps)) - half) / half


def _pair(value: Any, argument: str) -> tuple[Any, Any]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{argument}: give one value or a pair (alpha, beta), got {value!r}")
        return value[0], value[1]
    return value, value
