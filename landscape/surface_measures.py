"""Surface scalars as measures of a model (listed in :mod:`landscape.metrics`): the
quadratic-fit curvature of 1D and 2D filter-normalized surfaces and the flatness radius, each
with the surfaces it was read off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._functional import LossFn, ModelLoss, ParamSelector
from .directions import Normalization, OneDMode
from .evaluate import loss_at_points
from .grid import centered_grid
from .surface import Surface1D, _directions, _model_loss, surface_2d
from .surface_fit import CURVATURE_WINDOW, FLATNESS_DELTA, _check_delta


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
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_directions: int,
    steps: int,
    span: float,
    normalization: Normalization,
    seed: int,
    one_d: OneDMode,
    params: ParamSelector,
    dtype: torch.dtype | None,
    model_loss: ModelLoss | None,
    chunk_size: int | None,
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
            alphas=alphas,
            loss=loss[i * s : (i + 1) * s],
            accuracy=None if acc is None else acc[i * s : (i + 1) * s],
            directions=[dicts[i]],
            center_loss=center_loss,
            center_accuracy=center_acc,
            normalization=normalization,
            seed=seed,
        )
        for i in range(k)
    ]


def curvature_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    num_directions: int = 2,
    steps: int = 21,
    span: float = 0.4,
    window: float = CURVATURE_WINDOW,
    normalization: Normalization = "filter",
    seed: int = 0,
    one_d: OneDMode = "zero",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> SurfaceMeasure:
    """Mean over ``num_directions`` seeded, filter-normalized directions of the quadratic-fit
    curvature ``d^2 L / d alpha^2`` over ``|alpha| <= window`` (default 0.2; grid: 21 points on
    ``[-0.4, 0.4]``). Scale-invariant; loss units per squared relative step."""
    surfaces = _surfaces_1d(
        model,
        loss_fn,
        data,
        num_directions,
        steps,
        span,
        normalization,
        seed,
        one_d,
        params,
        dtype,
        model_loss,
        chunk_size,
        memory_budget,
    )
    per = np.array([s.curvature(window) for s in surfaces])
    return SurfaceMeasure(value=float(per.mean()), per_direction=per, surfaces=surfaces)


def flatness_radius(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    delta: float = FLATNESS_DELTA,
    num_directions: int = 2,
    steps: int = 41,
    span: float = 1.0,
    normalization: Normalization = "filter",
    seed: int = 0,
    one_d: OneDMode = "zero",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> SurfaceMeasure:
    """Mean over ``num_directions`` filter-normalized directions (both signs of each) of the
    distance at which the loss first rises ``delta`` (default 0.1) above the model's loss, in
    units of the relative step alpha; ``inf`` when some ray never rises that much within
    ``span`` (grid: 41 points on ``[-1, 1]``). Larger is flatter."""
    _check_delta(delta)
    surfaces = _surfaces_1d(
        model,
        loss_fn,
        data,
        num_directions,
        steps,
        span,
        normalization,
        seed,
        one_d,
        params,
        dtype,
        model_loss,
        chunk_size,
        memory_budget,
    )
    per = np.array([s.flatness_radius(delta) for s in surfaces])
    return SurfaceMeasure(value=float(per.mean()), per_direction=per, surfaces=surfaces)


def curvature_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    steps: int = 21,
    span: float = 0.4,
    window: float = CURVATURE_WINDOW,
    normalization: Normalization = "filter",
    seed: int = 0,
    one_d: OneDMode = "zero",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> SurfaceMeasure:
    """Largest eigenvalue of the 2 x 2 Hessian fitted to a filter-normalized 2D surface over
    ``|alpha|, |beta| <= window`` (default 0.2; grid 21 x 21 on ``[-0.4, 0.4]^2``);
    ``per_direction`` holds both eigenvalues, ascending."""
    surface = surface_2d(
        model,
        loss_fn,
        data,
        steps=steps,
        span=span,
        normalization=normalization,
        seed=seed,
        one_d=one_d,
        params=params,
        dtype=dtype,
        model_loss=model_loss,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
    )
    eig = surface.curvature(window).eigenvalues
    return SurfaceMeasure(value=float(eig[-1]), per_direction=eig, surfaces=[surface])
