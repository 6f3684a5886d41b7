"""Losses and scores of the trained models: the configurable losses (:data:`LOSSES`), the
evaluation of one model, and each stacked member's loss and correct predictions at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from landscape._functional import training_mode


def half_squared_errors(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per sample ``1/2 ||f(x_n) - t_n||^2`` ``[N]``; integer class labels become one-hot targets."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - targets).pow(2).reshape(len(outputs), -1).sum(-1)


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_n 1/2 ||f(x_n) - t_n||^2``; integer class labels become one-hot targets."""
    return half_squared_errors(outputs, targets).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": half_squared_error,
}


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``(x, y)`` in eval mode, in chunks of ``batch_size``."""
    total_loss, correct = 0.0, 0.0
    with training_mode(model, False):
        for i in range(0, len(y), batch_size):
            out = model(x[i : i + batch_size])
            total_loss += float(loss_fn(out, y[i : i + batch_size])) * len(out)
            correct += float((out.argmax(-1) == y[i : i + batch_size]).sum())
    return total_loss / len(y), correct / len(y)


def member_losses(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Each member's batch-mean loss: ``outputs [K, B, C]``, ``targets [K, B]`` -> ``[K]``
    (the per-member value of ``LOSSES[loss]``; nothing is reduced across members)."""
    if loss == "cross_entropy" and outputs[..., 0].numel() < 128:  # few rows: the fused kernel is faster
        k, b = outputs.shape[:2]
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none").view(k, b).mean(1)
    if loss == "cross_entropy":
        return _cross_entropies(outputs, targets).mean(1)
    k, b = outputs.shape[:2]
    return half_squared_errors(outputs.flatten(0, 1), targets.flatten(0, 1)).view(k, b).mean(1)


def member_hits(outputs: Tensor, labels: Tensor) -> Tensor:
    """Correct predictions per member: ``outputs [K, B, C]``, ``labels [K, B]`` -> ``[K]``.
    ``max(-1).indices`` is the first maximum, as ``argmax``, and several times faster over a
    strided class axis (the stacked MLP's outputs)."""
    return (outputs.max(-1).indices == labels).sum(1)


def _cross_entropies(outputs: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy per sample: ``outputs [..., C]``, ``labels [...]`` -> ``[...]``.
    The log-softmax runs over a leading class axis: on a CPU that is ~5x faster than
    ``F.cross_entropy`` over a last axis of 10 classes (forward and backward)."""
    log_p = outputs.movedim(-1, 0).contiguous().log_softmax(0)
    return -log_p.gather(0, labels.unsqueeze(0)).squeeze(0)
