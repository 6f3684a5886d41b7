"""Shared plumbing of the sharpness measures (:mod:`landscape.keskar`,
:mod:`landscape.m_sharpness`, :mod:`landscape.flatness`): seeded draws, argument checks, the
groups of examples that share one perturbation, and the loss, gradient and accuracy of a group at
flat parameters.

Draws come from a CPU generator, so the same seed gives the same draws on every device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._functional import Batch, LossFn, ModelLoss, ParamSelector, is_classification

Norm = Literal[2, "inf"]


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def _model_loss(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: ParamSelector,
    dtype: torch.dtype | None,
    model_loss: ModelLoss | None,
) -> ModelLoss:
    if model_loss is not None:
        return model_loss
    return ModelLoss(model, loss_fn, data, params=params, dtype=dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(ml: ModelLoss, gen: torch.Generator, *shape: int) -> Tensor:
    """Standard normal draws from a CPU generator, moved to the model's device (reproducible)."""
    return torch.randn(*shape, generator=gen, dtype=ml.dtype).to(ml.device)


def _rand_box(ml: ModelLoss, gen: torch.Generator, *shape: int) -> Tensor:
    """Uniform draws on ``[-1, 1]`` (CPU generator, moved to the model's device)."""
    return (2 * torch.rand(*shape, generator=gen, dtype=ml.dtype) - 1).to(ml.device)


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number {bound} (got {value!r})")


def _check_count(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) and value >= 1):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name}: must be a positive integer{extra} (got {value!r})")


def _check_norm(p: Any) -> Norm:
    if p in (2, "2"):
        return 2
    if p in ("inf", float("inf"), "linf"):
        return "inf"
    raise ValueError(f"p: must be 2 or 'inf' (got {p!r})")


def _slice_inputs(inputs: Any, sl: slice) -> Any:
    return tuple(t[sl] for t in inputs) if isinstance(inputs, tuple) else inputs[sl]


def _cat_inputs(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))
    return torch.cat(list(parts))


def _example_groups(ml: ModelLoss, m: int | None, n_examples: int | None) -> list[Iterable[Batch]]:
    """The first ``n_examples`` examples of the data (all if ``None``), as groups that share one
    perturbation: batches of ``m`` examples, or (``m=None``) one group of the original batches."""
    if m is None and n_examples is None:
        return [ml.batches]  # streamed: a DataLoader is not pulled into memory
    batches, count = [], 0
    for inputs, targets in ml.batches:
        if n_examples is not None and count >= n_examples:
            break
        take = len(targets) if n_examples is None else min(len(targets), n_examples - count)
        batches.append((_slice_inputs(inputs, slice(0, take)), targets[:take]))
        count += take
    if m is None:
        return [batches]
    inputs = _cat_inputs([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    return [[(_slice_inputs(inputs, slice(i, i + m)), targets[i : i + m])] for i in range(0, count, m)]


def _batches(ml: ModelLoss, group: Iterable[Batch]) -> list[Batch] | None:
    """A group of examples as the evaluator's ``batches`` (``None``: all of ``ml``'s data)."""
    return None if group is ml.batches else list(group)


def _group_size(group: Iterable[Batch]) -> int:
    return sum(len(t) for _, t in group)


@torch.no_grad()
def _loss(ml: ModelLoss, loss_fn: LossFn, group: Iterable[Batch], flat: Tensor) -> float:
    """Mean loss of a group of batches at flat parameters ``flat`` (sample-weighted)."""
    p = ml.unflatten(flat)
    total, n = 0.0, 0
    for x, y in group:
        total += len(y) * float(loss_fn(ml.forward(p, x), y))
        n += len(y)
    return total / n


def _loss_and_grad(
    ml: ModelLoss,
    loss_fn: LossFn,
    group: Iterable[Batch],
    to_flat: Callable[[Tensor], Tensor],
    z: Tensor,
) -> tuple[float, Tensor]:
    """Mean loss over ``group`` at ``to_flat(z)`` and its gradient w.r.t. ``z``, batch by batch
    (one graph alive at a time)."""
    value, grad, n = 0.0, torch.zeros_like(z), 0
    for x, y in group:
        leaf = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(ml.forward(ml.unflatten(to_flat(leaf)), x), y)
            (g,) = torch.autograd.grad(loss, leaf)
        value += float(loss.detach()) * len(y)
        grad += g * len(y)
        n += len(y)
    return value / n, grad / n


@torch.no_grad()
def _accuracy(ml: ModelLoss, group: Iterable[Batch], flat: Tensor) -> float:
    """Accuracy over the examples of ``group`` at flat parameters ``flat`` (in ``ml.mode()``)."""
    p = ml.unflatten(flat)
    correct, n = 0.0, 0
    for x, y in group:
        correct += float((ml.forward(p, x).argmax(-1) == y).sum())
        n += len(y)
    return correct / n


def _require_classification(ml: ModelLoss, what: str) -> None:
    with torch.no_grad(), ml.mode():
        inputs, targets = next(iter(ml.batches))
        outputs = ml.forward(ml.theta, inputs)
    if not is_classification(outputs, targets):
        raise ValueError(
            f"{what} is defined by a drop in training accuracy: it needs [n, C] class scores and "
            f"integer labels [n] (got outputs {tuple(outputs.shape)}, targets "
            f"{tuple(targets.shape)} {targets.dtype}). Use worst_case_sharpness / "
            "average_sharpness for other losses."
        )
