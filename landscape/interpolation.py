"""Interpolation between two models: the loss on the line through their weights, and the
barrier on the segment between them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._functional import LossFn, ModelLoss, ParamSelector
from .directions import Direction, ModelOrState, _matching, _state_of, as_flat, direction_to
from .evaluate import loss_at_points
from .grid import _BOUNDARY_TOL, _pair


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
        alphas=alphas,
        loss=loss,
        accuracy=acc,
        loss_a=loss_a,
        loss_b=loss_b,
        accuracy_a=acc_a,
        accuracy_b=acc_b,
        direction=delta,
    )
