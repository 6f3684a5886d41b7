"""Loss surfaces: 1D and 2D slices of the loss around a model, interpolation between two models,
and the scalars read off them (quadratic-fit curvature, flatness radius).

A surface evaluates the data-set loss (and accuracy, for classifiers) at the points

    theta(alpha, beta) = theta + alpha d1 + beta d2

of a grid centered on the model's weights ``theta``. Points are never materialized as model
copies; :mod:`landscape.evaluate` (the batched evaluator shared with interpolation and the
sharpness measures) evaluates them: stacked parameter sets, buffers reused from point to point,
and the first layer's pre-activations computed once per surface where that pays. Defaults follow Li et al.
(2018): filter-normalized Gaussian directions, a 51 x 51 grid on ``[-1, 1]^2``, eval mode,
training data.

Index order: ``loss[i]`` is at ``alphas[i] d``; ``loss[i, j]`` is at ``alphas[i] d1 + betas[j] d2``
(rows follow ``d1``, as ``numpy.meshgrid(..., indexing="ij")``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import LossFn, ModelLoss, ParamSelector
from .evaluate import (  # noqa: F401 (the evaluator's names, importable from here as before)
    MIN_MICRO_BATCH,
    WORKING_SET,
    bytes_per_point,
    choose_chunk_size,
    default_memory_budget,
    loss_at_points,
)
from .directions import (
    Direction,
    ModelOrState,
    Normalization,
    OneDMode,
    _matching,
    _state_of,
    as_flat,
    direction_to,
    random_directions,
)

DirectionLike = Union[Mapping[str, Tensor], Tensor]

#: Default half-width of the quadratic-fit window, in grid coordinates (|alpha|, |beta|).
CURVATURE_WINDOW = 0.2
#: Default loss rise (in loss units, e.g. nats) that defines the flatness radius.
FLATNESS_DELTA = 0.1
_BOUNDARY_TOL = 1e-9


# --- grids -------------------------------------------------------------------------------------
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


# --- scalars read off a surface ----------------------------------------------------------------
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
    design = np.column_stack(
        [np.ones(len(x)), x] + [x[:, i] * x[:, j] * (0.5 if i == j else 1.0) for i, j in pairs]
    )
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


# --- results -----------------------------------------------------------------------------------
@dataclass
class Surface1D:
    """Loss (and accuracy) along one direction: ``loss[i]`` at ``theta + alphas[i] d``.

    Attributes:
        alphas: ``[steps]`` coordinates on ``[-span, span]`` (units of ``d``).
        loss: ``[steps]`` data-set mean loss.
        accuracy: ``[steps]`` accuracy in [0, 1], or ``None`` for non-classification losses.
        directions: ``[d]``: the direction used, ``{name: tensor}`` over the varied parameters.
        center_loss, center_accuracy: loss/accuracy of the model itself (evaluated directly).
        normalization, seed: how random directions were drawn (``None`` for given directions).
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    directions: list[Direction]
    center_loss: float
    center_accuracy: float | None
    normalization: str | None = None
    seed: int | None = None

    @property
    def direction(self) -> Direction:
        return self.directions[0]

    def quadratic_fit(self, window: float = CURVATURE_WINDOW) -> QuadraticFit:
        """Quadratic fit over ``|alpha| <= window`` (default 0.2); see :func:`quadratic_fit`."""
        return quadratic_fit(self.alphas[:, None], self.loss, window)

    def curvature(self, window: float = CURVATURE_WINDOW) -> float:
        """Second derivative ``d^2 L / d alpha^2`` of the quadratic fit over ``|alpha| <= window``.

        For filter-normalized directions it is scale-invariant (Dinh et al. 2017); for a unit
        direction it estimates ``d^T H d``.
        """
        return float(self.quadratic_fit(window).hessian[0, 0])

    def flatness_radius(self, delta: float = FLATNESS_DELTA) -> float:
        """Mean over the two rays ``+d`` and ``-d`` of the distance (in units of alpha) at which
        the loss first rises ``delta`` above :attr:`center_loss`; ``inf`` if it does not rise that
        much within the span on some ray (the minimum is flatter than the grid can tell)."""
        return float(np.mean(self.flatness_radii(delta)))

    def flatness_radii(self, delta: float = FLATNESS_DELTA) -> np.ndarray:
        """Per-ray radii ``[+d, -d]`` (see :meth:`flatness_radius`)."""
        _check_delta(delta)
        return np.array([ray_crossing(d, v, self.center_loss, delta) for d, v in _rays_of_axis(self.alphas, self.loss)])


@dataclass
class Surface2D:
    """Loss (and accuracy) on a plane: ``loss[i, j]`` at ``theta + alphas[i] d1 + betas[j] d2``.

    Attributes:
        alphas: ``[steps_alpha]`` coordinates along ``d1``; betas: ``[steps_beta]`` along ``d2``.
        loss: ``[steps_alpha, steps_beta]`` data-set mean loss.
        accuracy: same shape, in [0, 1], or ``None`` for non-classification losses.
        directions: ``[d1, d2]`` as ``{name: tensor}`` over the varied parameters.
        center_loss, center_accuracy: loss/accuracy of the model itself (evaluated directly).
        normalization, seed: how random directions were drawn (``None`` for given directions).
    """

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    directions: list[Direction]
    center_loss: float
    center_accuracy: float | None
    normalization: str | None = None
    seed: int | None = None

    def coords(self) -> np.ndarray:
        """``[steps_alpha * steps_beta, 2]`` coordinates in the order of ``loss.reshape(-1)``."""
        a, b = np.meshgrid(self.alphas, self.betas, indexing="ij")
        return np.column_stack([a.reshape(-1), b.reshape(-1)])

    def quadratic_fit(self, window: float = CURVATURE_WINDOW) -> QuadraticFit:
        """Quadratic fit over the square ``|alpha|, |beta| <= window`` (default 0.2)."""
        return quadratic_fit(self.coords(), self.loss.reshape(-1), window)

    def curvature(self, window: float = CURVATURE_WINDOW) -> QuadraticFit:
        """The fitted 2 x 2 Hessian (``.hessian``) in grid coordinates and its eigenvalues
        (``.eigenvalues``, ascending); see :meth:`quadratic_fit`."""
        return self.quadratic_fit(window)

    def flatness_radius(self, delta: float = FLATNESS_DELTA) -> float:
        """Mean over the four rays ``+d1, -d1, +d2, -d2`` of the distance (in grid coordinates)
        at which the loss first rises ``delta`` above :attr:`center_loss`; ``inf`` if some ray
        stays below within the span. Needs the axes through the center (odd steps)."""
        return float(np.mean(self.flatness_radii(delta)))

    def flatness_radii(self, delta: float = FLATNESS_DELTA) -> np.ndarray:
        """Per-ray radii ``[+d1, -d1, +d2, -d2]`` (see :meth:`flatness_radius`)."""
        _check_delta(delta)
        i0, j0 = np.flatnonzero(self.alphas == 0), np.flatnonzero(self.betas == 0)
        if len(i0) == 0 or len(j0) == 0:
            raise ValueError(
                "flatness_radius: the grid has no axis through the center; use an odd number of steps"
            )
        rays = _rays_of_axis(self.alphas, self.loss[:, j0[0]]) + _rays_of_axis(self.betas, self.loss[i0[0], :])
        return np.array([ray_crossing(d, v, self.center_loss, delta) for d, v in rays])


@dataclass
class Interpolation:
    """Loss (and accuracy) on the line ``theta_a + t (theta_b - theta_a)``.

    Attributes:
        alphas: ``[steps]`` values of ``t`` (0 is model_a, 1 is model_b).
        loss, accuracy: ``[steps]`` (accuracy ``None`` for non-classification losses).
        loss_a, loss_b, accuracy_a, accuracy_b: the end points, evaluated directly.
        direction: ``theta_b - theta_a`` over the varied parameters.
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    loss_a: float
    loss_b: float
    accuracy_a: float | None
    accuracy_b: float | None
    direction: Direction

    def _segment(self) -> tuple[np.ndarray, np.ndarray]:
        on = (self.alphas >= -_BOUNDARY_TOL) & (self.alphas <= 1 + _BOUNDARY_TOL)
        t = np.concatenate([[0.0], self.alphas[on], [1.0]])
        v = np.concatenate([[self.loss_a], self.loss[on], [self.loss_b]])
        return t, v

    @property
    def barrier(self) -> float:
        """``max_{t in [0, 1]} L(t) - (L(0) + L(1)) / 2`` over the grid points of the segment and
        the two end points (>= 0; 0 means no barrier that the grid can see)."""
        _, v = self._segment()
        return float(v.max() - (self.loss_a + self.loss_b) / 2)

    @property
    def barrier_linear(self) -> float:
        """``max_{t in [0, 1]} L(t) - ((1 - t) L(0) + t L(1))``: the height above the chord
        (the definition of Frankle et al. 2020, differs from :attr:`barrier` when the end
        losses differ)."""
        t, v = self._segment()
        return float(np.max(v - ((1 - t) * self.loss_a + t * self.loss_b)))


# --- public entry points -----------------------------------------------------------------------
def _model_loss(
    model: nn.Module, loss_fn: LossFn, data: Any, given: Sequence[DirectionLike] | None,
    params: ParamSelector, dtype: torch.dtype | None, train_mode: bool, prebuilt: ModelLoss | None = None,
) -> ModelLoss:
    """The functional loss over the parameters the surface varies: ``prebuilt`` if given, else
    over those the given directions name (in the model's order), else over ``params``."""
    if prebuilt is not None:
        if prebuilt.model is not model:
            raise ValueError("model_loss: was built for another model; pass the same model or omit it")
        return prebuilt
    if given is not None and params is None and isinstance(given[0], Mapping):
        named = set(given[0])
        params = [n for n, _ in model.named_parameters() if n in named]
        unknown = sorted(named - set(params))
        if unknown:
            raise KeyError(f"directions: the model has no parameter named {unknown}")
    return ModelLoss(model, loss_fn, data, params=params, dtype=dtype, train_mode=train_mode)


def _as_dicts(block: Tensor, model_loss: ModelLoss) -> list[Direction]:
    return [{n: t.clone() for n, t in model_loss.unflatten(row).items()} for row in block]


def _directions(
    model: nn.Module, model_loss: ModelLoss, given: Sequence[DirectionLike] | None, count: int,
    normalization: Normalization, seed: int, one_d: OneDMode,
) -> tuple[Tensor, list[Direction]]:
    if given is None:
        dicts = random_directions(
            model, count, seed=seed, normalization=normalization, one_d=one_d,
            params=model_loss.names, dtype=model_loss.dtype,
        )
        return as_flat(dicts, model_loss), dicts
    if len(given) != count:
        raise ValueError(f"directions: expected {count}, got {len(given)}")
    block = as_flat(given, model_loss)
    return block, _as_dicts(block, model_loss)


def surface_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    steps: int = 51,
    span: float = 1.0,
    direction: DirectionLike | None = None,
    normalization: Normalization = "filter",
    seed: int = 0,
    *,
    one_d: OneDMode = "zero",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    micro_batch: int | str | None = "auto",
    model_loss: ModelLoss | None = None,
) -> Surface1D:
    """Loss of ``model`` along one direction, ``L(theta + alpha d)`` for ``alpha`` in ``[-span, span]``.

    Args:
        model: read only (weights, modes, ``requires_grad`` and ``.grad`` are left as they are).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        data: one ``(inputs, targets)`` batch or an iterable of batches (training data, as in
            Li et al.); the loss is the sample-weighted mean over all of it.
        steps: grid points (default 51; odd puts the model itself at the middle).
        span: half-width of the grid in units of ``d`` (default 1.0).
        direction: ``{name: tensor}`` or a flat ``[P]`` vector, used as given (no normalization;
            see :func:`landscape.directions.normalize_direction`). Default: a seeded Gaussian
            direction normalized by ``normalization``.
        normalization: ``"filter"`` (default), ``"layer"`` or ``"none"`` for the random direction.
        seed: seed of the random direction (:func:`landscape.random_directions`).
        one_d: what parameters with at most one dimension get: ``"zero"`` (default), ``"keep"``,
            ``"filter"``.
        params: parameters to vary (default: all with ``requires_grad``, or the ones a given
            direction names); the others stay fixed.
        dtype: computing dtype (e.g. ``torch.float64``); default the model's.
        train_mode: evaluate in train mode (default eval mode).
        chunk_size, memory_budget: grid points per vmapped pass, or the bytes a pass may use
            (default: half the free memory on CUDA, 256 MiB elsewhere).
        micro_batch: ``"auto"`` (default), ``None`` or a number of samples: how points and
            batches are cut on a CPU (see :func:`loss_at_points`; never changes the values).
        model_loss: a prebuilt :class:`~landscape.ModelLoss` of ``model`` to reuse (its
            parameter selection, dtype and mode replace ``params``, ``dtype``, ``train_mode``).
    """
    given = None if direction is None else [direction]
    ml = _model_loss(model, loss_fn, data, given, params, dtype, train_mode, model_loss)
    block, dicts = _directions(model, ml, given, 1, normalization, seed, one_d)
    alphas = centered_grid(span, steps)
    loss, acc = loss_at_points(
        ml, block, alphas[:, None], chunk_size=chunk_size, memory_budget=memory_budget, micro_batch=micro_batch
    )
    center_loss, center_acc = ml.evaluate()
    return Surface1D(
        alphas=alphas, loss=loss, accuracy=acc, directions=dicts, center_loss=center_loss,
        center_accuracy=center_acc, normalization=normalization if given is None else None,
        seed=seed if given is None else None,
    )


def surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    steps: int | tuple[int, int] = 51,
    span: float | tuple[float, float] = 1.0,
    normalization: Normalization = "filter",
    seed: int = 0,
    directions: Sequence[DirectionLike] | None = None,
    *,
    one_d: OneDMode = "zero",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    micro_batch: int | str | None = "auto",
    model_loss: ModelLoss | None = None,
) -> Surface2D:
    """Loss of ``model`` on the plane ``theta + alpha d1 + beta d2``; ``loss[i, j]`` is at
    ``(alphas[i], betas[j])``.

    ``steps`` and ``span`` take one value for both axes or a pair ``(alpha, beta)`` (e.g.
    ``span=pca.span()`` for a trajectory plane). ``directions``: two ``{name: tensor}`` dicts or
    flat vectors, used as given (e.g. ``pca_directions(...).directions``); default: two seeded
    Gaussian directions normalized by ``normalization``. Other arguments as in
    :func:`surface_1d`. Defaults: a 51 x 51 grid on ``[-1, 1]^2`` with filter-normalized
    directions (Li et al. 2018).
    """
    if directions is not None and (isinstance(directions, (Tensor, Mapping)) or len(directions) != 2):
        raise ValueError("directions: give a pair [d1, d2] of dicts or flat vectors")
    ml = _model_loss(model, loss_fn, data, directions, params, dtype, train_mode, model_loss)
    block, dicts = _directions(model, ml, directions, 2, normalization, seed, one_d)
    steps_a, steps_b = _pair(steps, "steps")
    span_a, span_b = _pair(span, "span")
    alphas, betas = centered_grid(span_a, steps_a), centered_grid(span_b, steps_b)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    loss, acc = loss_at_points(
        ml, block, np.column_stack([a.reshape(-1), b.reshape(-1)]),
        chunk_size=chunk_size, memory_budget=memory_budget, micro_batch=micro_batch,
    )
    shape = (len(alphas), len(betas))
    center_loss, center_acc = ml.evaluate()
    return Surface2D(
        alphas=alphas, betas=betas, loss=loss.reshape(shape),
        accuracy=None if acc is None else acc.reshape(shape), directions=dicts,
        center_loss=center_loss, center_accuracy=center_acc,
        normalization=normalization if directions is None else None,
        seed=seed if directions is None else None,
    )


def interpolate(
    model_a: nn.Module,
    model_b: ModelOrState,
    loss_fn: LossFn,
    data: Any,
    steps: int = 41,
    span: tuple[float, float] = (-0.5, 1.5),
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    micro_batch: int | str | None = "auto",
) -> Interpolation:
    """Loss along the line through two models, ``theta_a + t (theta_b - theta_a)``, ``t`` in
    ``span`` (default ``[-0.5, 1.5]``, Goodfellow et al. 2015 / Li et al. 2018).

    ``model_b`` is a model of the same architecture or its state dict; only the varied
    parameters are interpolated: everything else (buffers such as batch-norm statistics,
    fixed parameters) is taken from ``model_a``. With the default 41 steps the grid has spacing
    0.05 and holds ``t = 0`` and ``t = 1``. See :class:`Interpolation` for the barrier.
    """
    lo, hi = _pair(span, "span")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"span: must be a pair (start, stop) with start < stop (got {span!r})")
    if int(steps) != steps or steps < 2:
        raise ValueError(f"steps: must be an integer >= 2 (got {steps!r})")
    ml = ModelLoss(model_a, loss_fn, data, params=params, dtype=dtype, train_mode=train_mode)
    delta = direction_to(model_a, model_b, params=ml.names, dtype=ml.dtype)
    block = as_flat([delta], ml)
    alphas = np.linspace(lo, hi, int(steps))
    loss, acc = loss_at_points(
        ml, block, alphas[:, None], chunk_size=chunk_size, memory_budget=memory_budget, micro_batch=micro_batch
    )
    loss_a, acc_a = ml.evaluate()
    loss_b, acc_b = ml.evaluate(_matching(_state_of(model_b, "model_b"), ml.theta, "model_b"))
    return Interpolation(
        alphas=alphas, loss=loss, accuracy=acc, loss_a=loss_a, loss_b=loss_b,
        accuracy_a=acc_a, accuracy_b=acc_b, direction=delta,
    )


# --- surface scalars as measures (listed in landscape.metrics) ---------------------------------
@dataclass
class SurfaceMeasure:
    """A scalar read off surfaces, with what it came from.

    Attributes:
        value: the measure (mean over directions, or the largest eigenvalue for 2D curvature).
        per_direction: ``[k]`` the value of each direction (eigenvalues, ascending, for 2D).
        surfaces: the :class:`Surface1D` / :class:`Surface2D` objects used.
    """

    value: float
    per_direction: np.ndarray
    surfaces: list


def _surfaces_1d(
    model: nn.Module, loss_fn: LossFn, data: Any, num_directions: int, steps: int, span: float,
    normalization: Normalization, seed: int, one_d: OneDMode, params: ParamSelector,
    dtype: torch.dtype | None, model_loss: ModelLoss | None, chunk_size: int | None,
    memory_budget: int | None,
) -> list[Surface1D]:
    """``num_directions`` 1D surfaces along the seeded directions 0..k-1 (the first two are
    :func:`surface_2d`'s ``d1, d2``), evaluated in one pass over the data."""
    if int(num_directions) != num_directions or num_directions < 1:
        raise ValueError(f"num_directions: must be a positive integer (got {num_directions!r})")
    ml = _model_loss(model, loss_fn, data, None, params, dtype, False, model_loss)
    block, dicts = _directions(model, ml, None, int(num_directions), normalization, seed, one_d)
    alphas = centered_grid(span, steps)
    k, s = len(dicts), len(alphas)
    coords = np.zeros((k * s, k))
    for i in range(k):  # rows i*s .. (i+1)*s - 1 move along direction i only
        coords[i * s : (i + 1) * s, i] = alphas
    loss, acc = loss_at_points(ml, block, coords, chunk_size=chunk_size, memory_budget=memory_budget)
    center_loss, center_acc = ml.evaluate()
    return [
        Surface1D(
            alphas=alphas, loss=loss[i * s : (i + 1) * s],
            accuracy=None if acc is None else acc[i * s : (i + 1) * s], directions=[dicts[i]],
            center_loss=center_loss, center_accuracy=center_acc, normalization=normalization, seed=seed,
        )
        for i in range(k)
    ]


def curvature_1d(
    model: nn.Module, loss_fn: LossFn, data: Any, *, num_directions: int = 2, steps: int = 21,
    span: float = 0.4, window: float = CURVATURE_WINDOW, normalization: Normalization = "filter",
    seed: int = 0, one_d: OneDMode = "zero", params: ParamSelector = None,
    dtype: torch.dtype | None = None, model_loss: ModelLoss | None = None,
    chunk_size: int | None = None, memory_budget: int | None = None,
) -> SurfaceMeasure:
    """Mean over ``num_directions`` seeded, filter-normalized directions of the quadratic-fit
    curvature ``d^2 L / d alpha^2`` over ``|alpha| <= window`` (default 0.2; grid: 21 points on
    ``[-0.4, 0.4]``). Scale-invariant; loss units per squared relative step."""
    surfaces = _surfaces_1d(model, loss_fn, data, num_directions, steps, span, normalization, seed, one_d,
                            params, dtype, model_loss, chunk_size, memory_budget)
    per = np.array([s.curvature(window) for s in surfaces])
    return SurfaceMeasure(value=float(per.mean()), per_direction=per, surfaces=surfaces)


def flatness_radius(
    model: nn.Module, loss_fn: LossFn, data: Any, *, delta: float = FLATNESS_DELTA,
    num_directions: int = 2, steps: int = 41, span: float = 1.0,
    normalization: Normalization = "filter", seed: int = 0, one_d: OneDMode = "zero",
    params: ParamSelector = None, dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None, chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> SurfaceMeasure:
    """Mean over ``num_directions`` filter-normalized directions (both signs of each) of the
    distance at which the loss first rises ``delta`` (default 0.1) above the model's loss, in
    units of the relative step alpha; ``inf`` when some ray never rises that much within
    ``span`` (grid: 41 points on ``[-1, 1]``). Larger is flatter."""
    _check_delta(delta)
    surfaces = _surfaces_1d(model, loss_fn, data, num_directions, steps, span, normalization, seed, one_d,
                            params, dtype, model_loss, chunk_size, memory_budget)
    per = np.array([s.flatness_radius(delta) for s in surfaces])
    return SurfaceMeasure(value=float(per.mean()), per_direction=per, surfaces=surfaces)


def curvature_2d(
    model: nn.Module, loss_fn: LossFn, data: Any, *, steps: int = 21, span: float = 0.4,
    window: float = CURVATURE_WINDOW, normalization: Normalization = "filter", seed: int = 0,
    one_d: OneDMode = "zero", params: ParamSelector = None, dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None, chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> SurfaceMeasure:
    """Largest eigenvalue of the 2 x 2 Hessian fitted to a filter-normalized 2D surface over
    ``|alpha|, |beta| <= window`` (default 0.2; grid 21 x 21 on ``[-0.4, 0.4]^2``);
    ``per_direction`` holds both eigenvalues, ascending."""
    surface = surface_2d(model, loss_fn, data, steps=steps, span=span, normalization=normalization, seed=seed,
                         one_d=one_d, params=params, dtype=dtype, model_loss=model_loss,
                         chunk_size=chunk_size, memory_budget=memory_budget)
    eig = surface.curvature(window).eigenvalues
    return SurfaceMeasure(value=float(eig[-1]), per_direction=eig, surfaces=[surface])
