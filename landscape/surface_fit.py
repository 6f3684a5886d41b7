"""The scalars read off a surface: the least-squares quadratic fit around its center (curvature)
and the distance at which the loss first rises by ``delta`` along a ray (flatness radius).
:class:`~landscape.Surface1D` and :class:`~landscape.Surface2D` call these for their
``quadratic_fit``, ``curvature`` and ``flatness_radius`` methods."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .grid import _BOUNDARY_TOL

#: Default half-width of the quadratic-fit window, in grid coordinates (|alpha|, |beta|).
CURVATURE_WINDOW = 0.2
#: Default loss rise (in loss units, e.g. nats) that defines the flatness radius.
FLATNESS_DELTA = 0.1


@dataclass
class QuadraticFit:
    """Least-squares quadratic ``L(x) ~ value + gradient . x + 1/2 x^T hessian x`` around the
    center of a surface, ``x`` in grid coordinates.

    Attributes:
        value: fitted loss at the center.
        gradient: ``[k]`` fitted slope (loss per unit coordinate).
        hessian: ``[k, k]`` fitted second derivatives (loss per unit coordinate squared).
        eigenvalues: ``[k]`` eigenvalues of ``hessian``, ascending.
        window: half-width of the window the fit used (``|x_i| <= window`` for every i).
        num_points: grid points inside the window.
    """

    value: float
    gradient: np.ndarray
    hessian: np.ndarray
    eigenvalues: np.ndarray
    window: float
    num_points: int


def quadratic_fit(coords: np.ndarray, values: np.ndarray, window: float = CURVATURE_WINDOW) -> QuadraticFit:
    """Fit a full quadratic in ``k`` variables to the points with ``max_i |coords_i| <= window``.

    Args:
        coords: ``[N, k]`` grid coordinates; values: ``[N]`` losses there.
        window: half-width of the (square) window around the origin, in coordinate units.
    """
    coords = np.asarray(coords, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not (isinstance(window, numbers.Real) and window > 0):
        raise ValueError(f"window: must be a positive number (got {window!r})")
    k = coords.shape[1]
    inside = np.all(np.abs(coords) <= window + _BOUNDARY_TOL, axis=1) & np.isfinite(values)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    needed = 1 + k + len(pairs)
    x = coords[inside]
    # columns: 1, x_i, and x_i x_j (x_i^2 / 2 on the diagonal) so coefficients are Hessian entries
    design = np.column_stack([np.ones(len(x)), x] + [x[:, i] * x[:, j] * (0.5 if i == j else 1.0) for i, j in pairs])
    if len(x) < needed or np.linalg.matrix_rank(design) < needed:
        raise ValueError(
            f"window: {window} holds {len(x)} grid points, too few to determine a quadratic in {k} "
            f"variables (at least 3 per axis are needed). Increase window or steps."
        )
    coef, *_ = np.linalg.lstsq(design, values[inside], rcond=None)
    hessian = np.zeros((k, k))
    for (i, j), c in zip(pairs, coef[1 + k :]):
        hessian[i, j] = hessian[j, i] = c
    return QuadraticFit(
        value=float(coef[0]),
        gradient=coef[1 : 1 + k],
        hessian=hessian,
        eigenvalues=np.linalg.eigvalsh(hessian),
        window=float(window),
        num_points=int(len(x)),
    )


def ray_crossing(distances: np.ndarray, values: np.ndarray, center: float, delta: float) -> float:
    """Distance along a ray at which the loss first reaches ``center + delta``.

    ``distances`` (increasing, > 0) and ``values`` are the grid points on the ray; the ray starts
    at distance 0 with loss ``center``. Linear interpolation between the two points around the
    crossing; ``inf`` if the loss stays below ``center + delta`` on every point of the ray.
    """
    level = center + delta
    prev_d, prev_v = 0.0, center
    for d, v in zip(distances, values):
        if v >= level:
            return float(prev_d + (level - prev_v) / (v - prev_v) * (d - prev_d))
        prev_d, prev_v = d, v
    return math.inf


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and delta > 0):
        raise ValueError(f"delta: must be a positive loss increase (got {delta!r})")


def _rays_of_axis(coords: np.ndarray, values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two rays (positive and negative side) of one grid axis through the origin."""
    pos, neg = coords > 0, coords < 0
    order = np.argsort(np.abs(coords[neg]))
    return [(coords[pos], values[pos]), (-coords[neg][order], values[neg][order])]
