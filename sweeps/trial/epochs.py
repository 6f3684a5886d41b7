"""How one epoch of a population is stepped: mini-batch epochs (each member on its own data
order, convergence checked a few times per epoch near the target), full-batch steps, and the
full-data gradient. A mixin of :class:`sweeps.trial.train._Population`, whose state (``live``,
``stack``, ``data``, ``step``, ``saver``, ...) it uses; the bookkeeping (records, leaving,
settling) stays there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..spec.status import TrialStatus
from . import checkpoint as checkpoints
from .losses import member_hits

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Protocol

    from .compiled_step import CompiledStack
    from .data import Dataset
    from .population import MemberLoss, Stack
    from .train import _Member

    class _PopulationState(Protocol):
        """What the epoch loops use of :class:`sweeps.trial.train._Population` (their ``self``)."""

        step: int

        @property
        def live(self) -> list[_Member]: ...
        @property
        def stack(self) -> Stack: ...
        @property
        def compiled(self) -> CompiledStack | None: ...
        @property
        def loss_fn(self) -> MemberLoss: ...
        @property
        def data(self) -> Dataset: ...
        @property
        def batch(self) -> int: ...
        @property
        def steps_per_epoch(self) -> int: ...
        @property
        def eval_batch(self) -> int: ...
        @property
        def mode_free(self) -> bool: ...
        @property
        def pending(self) -> dict[int, tuple[TrialStatus, str, int]]: ...
        @property
        def saver(self) -> checkpoints.Cadence: ...
        def evaluate(self, rows: Sequence[int], x: Tensor, y: Tensor) -> list[tuple[float, float]]: ...
        def track(self, epoch: int) -> None: ...
        def leave(self, row: int, status: TrialStatus, reason: str, epoch: int) -> None: ...
        def settle(self) -> list[int] | None: ...
        def _train_step(self, x: Tensor, y: Tensor) -> list[float]: ...
        def _full_batch_gradient(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[tuple[float, float]]]: ...


class EpochSteps:
    """The epoch loops of :class:`sweeps.trial.train._Population` (see the module docstring)."""

    def _train_step(self: _PopulationState, x: Tensor, y: Tensor) -> list[float]:
        """One optimizer step of every live member on its batch ``x [K, B, ...]``, ``y [K, B]``;
        returns the members' mini-batch losses (before the step)."""
        lrs = [m.lr(self.step) for m in self.live]
        losses = None if self.compiled is None else self.compiled.train_step(x, y, lrs)
        if losses is None:  # eager (or compiling failed)
            grad, losses, _ = self.stack.gradient(self.loss_fn, x, y)
            self.stack.step(grad, lrs)
        self.step += 1
        return losses.tolist()

    def _mini_batch_epoch(self: _PopulationState, epoch: int, first: int = 0, orders: Tensor | None = None) -> None:
        """One epoch of mini-batch steps, from its batch ``first`` with the data ``orders``
        ``[K, n]`` of a checkpoint (default: the whole epoch, orders drawn here)."""
        x, y, b = self.data.x_train, self.data.y_train, self.batch
        if orders is None:
            orders = torch.stack([torch.randperm(len(y), generator=m.gen) for m in self.live]).to(y.device)
        check_every = max(1, self.steps_per_epoch // 4)
        for i in range(first, self.steps_per_epoch):
            idx = orders[:, i * b : (i + 1) * b]
            flat_idx = idx.reshape(-1)
            losses = self._train_step(
                x.index_select(0, flat_idx).view(*idx.shape, *x.shape[1:]), y.index_select(0, flat_idx).view(idx.shape)
            )
            for row, (m, loss) in enumerate(zip(self.live, losses)):
                m.checked = None
                if m.diverged(loss):
                    self.leave(row, TrialStatus.DIVERGED, f"mini-batch loss {loss:.4g} at step {self.step}", epoch)
                else:
                    m.running = 0.9 * m.running + 0.1 * loss
            self.track(epoch)
            if i < self.steps_per_epoch - 1 and (i + 1) % check_every == 0:
                near = [
                    r
                    for r, m in enumerate(self.live)
                    if r not in self.pending and (m.near(*m.latest) or m.near(m.running, 0.0))
                ]
                for row, ev in zip(near, self.evaluate(near, x, y)):
                    m = self.live[row]
                    m.checked = m.latest = ev
                    if m.reached(*ev):
                        self.leave(row, TrialStatus.CONVERGED, f"target met at step {self.step}", epoch)
            keep = self.settle()
            if keep is not None:
                if not self.live:
                    return
                orders = orders[keep]
            if self.saver.due(epoch, epoch_end=False):
                checkpoints.capture(self, epoch, i + 1, orders)
        for row, ev in enumerate(self.evaluate(range(len(self.live)), x, y)):
            m = self.live[row]
            m.checked = m.latest = ev
            if m.diverged(ev[0]):
                self.leave(row, TrialStatus.DIVERGED, f"train loss {ev[0]:.4g} after epoch {epoch}", epoch)
            elif m.reached(*ev):
                self.leave(row, TrialStatus.CONVERGED, f"target met after epoch {epoch}", epoch)
        self.settle()

    def _full_batch_epoch(self: _PopulationState, epoch: int) -> None:
        x, y = self.data.x_train, self.data.y_train
        grad, evals = self._full_batch_gradient(x, y)
        if not self.mode_free:
            evals = self.evaluate(range(len(self.live)), x, y)
        for row, ev in enumerate(evals):
            m = self.live[row]
            m.checked = ev
            if m.diverged(ev[0]):
                self.leave(
                    row, TrialStatus.DIVERGED, f"train loss {ev[0]:.4g} at step {self.step}", epoch - 1
                )  # this pass only evaluated
            elif m.reached(*ev):
                self.leave(row, TrialStatus.CONVERGED, f"target met at step {self.step}", epoch - 1)
        keep = self.settle()
        if keep is not None:
            if not self.live:
                return
            grad = grad[keep]
        self.stack.step(grad, [m.lr(self.step) for m in self.live])
        self.step += 1
        for m in self.live:
            m.checked = None
        self.track(epoch)

    def _full_batch_gradient(self: _PopulationState, x: Tensor, y: Tensor) -> tuple[Tensor, list[tuple[float, float]]]:
        """The full-data gradient ``[K, P]`` (chunks weighted by size) and each member's
        ``(loss, accuracy)`` at the current weights, in the models' training mode."""
        n, k, chunk = len(y), len(self.live), self.eval_batch
        grad, totals, correct = None, [0.0] * k, [0.0] * k
        for i in range(0, n, chunk):
            part = y[i : i + chunk].expand(k, -1)
            g, losses, out = self.stack.gradient(
                self.loss_fn, x[i : i + chunk], part, shared=True, weight=part.shape[1] / n
            )
            grad = g.clone() if grad is None else grad.add_(g)
            totals = [t + l * part.shape[1] for t, l in zip(totals, losses.tolist())]
            correct = [c + h for c, h in zip(correct, member_hits(out, part).tolist())]
        assert grad is not None
        return grad, [(t / n, c / n) for t, c in zip(totals, correct)]
