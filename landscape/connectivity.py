"""Linear mode connectivity: the loss and error barrier on the straight line between two weight vectors.

For two trained models ``A`` and ``B`` of one architecture (e.g. trained from different seeds),
the path ``w(a) = (1 - a) w_A + a w_B``, ``a`` in ``[0, 1]``, is evaluated at ``points`` evenly
spaced values of ``a`` (ends included). The **barrier** of a quantity ``f`` along it is its largest
excess over the straight line between its end values (Frankle et al. 2020, "Linear mode
connectivity and the lottery ticket hypothesis", ICML, definition 1)::

    barrier = max_a  f(w(a)) - ((1 - a) f(w_A) + a f(w_B))

``0`` (at the ends) or more; two minima are *linearly connected* within a tolerance when the error
barrier is below it. Every floating-point entry of the state dicts (parameters and buffers, e.g.
batch-norm running statistics) is interpolated; integer buffers are taken from ``A``. Batch-norm
statistics are not re-estimated (a choice that raises barriers of batch-norm nets; see Jordan et
al. 2023, REPAIR). No permutation alignment of hidden units is done.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._functional import LossFn


@dataclass
class LinearPath:
    """The line between two weight vectors, evaluated.

    Attributes:
        alphas: ``[T]`` the interpolation coefficients (0: model A, 1: model B).
        loss: ``[T]`` the sample-weighted mean loss over the data at each point.
        error: ``[T]`` the fraction of samples misclassified (argmax of the outputs; NaN when the
            targets are not class labels).
        loss_barrier: largest excess of ``loss`` over the chord between its ends (loss units).
        error_barrier: the same for ``error`` (a fraction in [0, 1]; NaN without class labels).
    """

    alphas: Tensor
    loss: Tensor
    error: Tensor
    loss_barrier: float
    error_barrier: float

    @property
    def value(self) -> float:
        """The loss barrier (what a registry-style reading reports)."""
        return self.loss_barrier


def barrier(values: Tensor, alphas: Tensor) -> float:
    """``max_a values(a) - ((1 - a) values(0) + a values(1))`` for ``values`` ``[T]`` at ``alphas``
    ``[T]`` (first and last the ends); NaN if any value is."""
    chord = (1 - alphas) * values[0] + alphas * values[-1]
    return float((values - chord).max())


def interpolate(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) A + alpha B`` for every floating-point entry; other entries from ``A``."""
    if set(state_a) != set(state_b):
        raise ValueError(f"state_b: keys differ from state_a's ({sorted(set(state_a) ^ set(state_b))[:5]})")
    return {
        k: torch.lerp(v, state_b[k].to(v), alpha) if v.is_floating_point() else v.clone() for k, v in state_a.items()
    }


@torch.no_grad()
def _evaluate(model: nn.Module, loss_fn: LossFn, data: Iterable[Any]) -> tuple[float, float]:
    total, wrong, n, labels = 0.0, 0.0, 0, True
    for x, y in data:
        out = model(x)
        total += float(loss_fn(out, y)) * len(y)
        n += len(y)
        labels = labels and not y.is_floating_point() and out.ndim == y.ndim + 1
        if labels:
            wrong += float((out.argmax(-1) != y).sum())
    return total / n, (wrong / n if labels else float("nan"))


def linear_path(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    points: int = 11,
) -> LinearPath:
    """Evaluate the line between the state dicts ``state_a`` and ``state_b`` of ``model``'s
    architecture at ``points`` values of ``a`` (default 11: steps of 0.1), in eval mode, on
    ``data`` (an iterable of ``(inputs, targets)`` batches, re-iterated per point). ``model``
    itself is never modified (a copy is loaded). Returns a :class:`LinearPath`."""
    if points < 2:
        raise ValueError(f"points: at least 2 (the two ends), got {points}")
    data = list(data)
    work = copy.deepcopy(model).eval()
    alphas = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    losses, errors = [], []
    for alpha in alphas.tolist():
        work.load_state_dict(interpolate(state_a, state_b, alpha))
        loss, error = _evaluate(work, loss_fn, data)
        losses.append(loss)
        errors.append(error)
    loss_t, error_t = torch.tensor(losses, dtype=torch.float64), torch.tensor(errors, dtype=torch.float64)
    return LinearPath(alphas, loss_t, error_t, barrier(loss_t, alphas), barrier(error_t, alphas))


__all__ = ["LinearPath", "barrier", "interpolate", "linear_path"]
