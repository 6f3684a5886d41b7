"""Loss surfaces: 1D and 2D slices of the loss around a model, and the scalars read off them
(quadratic-fit curvature, flatness radius; computed in :mod:`landscape.surface_fit`).
Interpolation between two models is in :mod:`landscape.interpolation`, the surface scalars as
measures of a model in :mod:`landscape.surface_measures`.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import LossFn, ModelLoss, ParamSelector
from .directions import Direction, Normalization, OneDMode, as_flat, random_directions
from .evaluate import (  # noqa: F401 (the evaluator's names, importable from here as before)
    MIN_MICRO_BATCH,
    WORKING_SET,
    bytes_per_point,
    choose_chunk_size,
    default_memory_budget,
    loss_at_points,
)
from .grid import _pair, centered_grid
from .surface_fit import (
    CURVATURE_WINDOW,
    FLATNESS_DELTA,
    QuadraticFit,
    _check_delta,
    _rays_of_axis,
    quadratic_fit,
    ray_crossing,
)

DirectionLike = Mapping[str, Tensor] | Tensor


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
            raise ValueError("flatness_radius: the grid has no axis through the center; use an odd number of steps")
        rays = _rays_of_axis(self.alphas, self.loss[:, j0[0]]) + _rays_of_axis(self.betas, self.loss[i0[0], :])
        return np.array([ray_crossing(d, v, self.center_loss, delta) for d, v in rays])


# --- public entry points -----------------------------------------------------------------------
def _model_loss(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    given: Sequence[DirectionLike] | None,
    params: ParamSelector,
    dtype: torch.dtype | None,
    train_mode: bool,
    prebuilt: ModelLoss | None = None,
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
    model: nn.Module,
    model_loss: ModelLoss,
    given: Sequence[DirectionLike] | None,
    count: int,
    normalization: Normalization,
    seed: int,
    one_d: OneDMode,
) -> tuple[Tensor, list[Direction]]:
    if given is None:
        dicts = random_directions(
            model,
            count,
            seed=seed,
            normalization=normalization,
            one_d=one_d,
            params=model_loss.names,
            dtype=model_loss.dtype,
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
        alphas=alphas,
        loss=loss,
        accuracy=acc,
        directions=dicts,
        center_loss=center_loss,
        center_accuracy=center_acc,
        normalization=normalization if given is None else None,
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
        ml,
        block,
        np.column_stack([a.reshape(-1), b.reshape(-1)]),
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        micro_batch=micro_batch,
    )
    shape = (len(alphas), len(betas))
    center_loss, center_acc = ml.evaluate()
    return Surface2D(
        alphas=alphas,
        betas=betas,
        loss=loss.reshape(shape),
        accuracy=None if acc is None else acc.reshape(shape),
        directions=dicts,
        center_loss=center_loss,
        center_accuracy=center_acc,
        normalization=normalization if directions is None else None,
        seed=seed if directions is None else None,
    )
