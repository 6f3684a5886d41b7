"""One compiled training step and one compiled evaluation for a population (``resources.compile``).

The eager stack (:class:`sweeps.trial.population.Stack`) runs each mini-batch step as many small
kernels with Python between them; at small widths that overhead, not arithmetic, bounds it. Here
the whole step of all K members -- stacked forward, per-member loss, gradients
(:func:`torch.func.grad_and_value` of the members' summed losses with respect to the ``[K, P]``
parameter buffer) and the optimizer update with per-member ``[K, 1]`` hyperparameter columns --
is one pure function under :func:`torch.compile` (CPU: inductor; CUDA: ``reduce-overhead``, CUDA
graphs). The full-data evaluations (loss and correct predictions of each member on a shared
chunk) are a second compiled function.

Numerics: the update is the one of :class:`sweeps.trial.population.StackedOptimizer` written without
its shortcuts (a zero weight decay is added, a zero momentum multiplies the buffer, Nesterov is a
``where``), which are exact identities for finite values; the optimizer state lives in the
stack's optimizer (``state``, ``steps``) so checkpoints, ``take`` and the eager path see it. The
compiled kernels may fuse and reorder floating-point operations, so compiled and eager agree to
round-off (about 1e-15 relative per step in float64), not bit for bit; one program is
deterministic, so a run repeated on one machine is bit-identical.

Members that leave the stack: the member axis K is compiled as a dynamic size
(``torch._dynamo.maybe_mark_dynamic``), so a population compiles once however many members
leave (see ``benchmarks/population.md`` for the measured alternatives). A single member runs as
two copies of itself (sizes 0 and 1 are always specialized), so its bits are the same whatever
K it trains in: checkpoints continue bit for bit in a population of another size.

Fallback: anything that fails while compiling or running the compiled step (no C++ compiler, an
operator inductor does not support) logs one line and the population goes on with the eager
stack from the same state; the step is functional, so a failed call changed nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .losses import half_squared_errors, member_hits
from .population import Forward, Stack, make_forward

log = logging.getLogger(__name__)

CompileSetting = bool | Literal["auto"]

#: ``auto`` compiles a population when it may take at least this many mini-batch steps (the
#: longest member's ``max_epochs`` x steps per epoch). Measured (benchmarks/population.md, width
#: 64, batch 32, K = 16, one core): compiling both programs costs about 2 s of CPU on an idle
#: machine with inductor's on-disk cache warm and up to ~17 s cold on a loaded one, and saves
#: about 0.2-0.3 ms per step against the eager stack, so it pays after roughly 10,000-60,000
#: steps; 20,000 keeps ``auto`` from compiling short populations.
AUTO_MIN_STEPS = 20000


def should_compile(setting: CompileSetting, expected_steps: int, mode_free: bool, full_batch: bool) -> bool:
    """Whether a population compiles: never for full-batch training (one step per full-data
    pass, bound by arithmetic) or for models with dropout / batch norm (their random streams and
    modes belong to the module); else ``setting``, and for ``"auto"`` when ``expected_steps``
    (the most mini-batch steps a member may take) reaches :data:`AUTO_MIN_STEPS`."""
    if full_batch or not mode_free or setting is False:
        return False
    return setting is True or expected_steps >= AUTO_MIN_STEPS


def _views(flat: Tensor, names: Sequence[str], sizes: Sequence[int], shapes: Sequence[torch.Size]) -> dict[str, Tensor]:
    """``{name: [K, *shape]}`` views of ``flat [K, P]`` (as :meth:`StackedParameters.views`)."""
    parts = torch.split(flat, list(sizes), dim=1)
    return {n: part.reshape(flat.shape[0], *s) for n, part, s in zip(names, parts, shapes)}


def _sgd(flat: Tensor, g: Tensor, buf: Tensor, lr: Tensor, momentum: Tensor, nesterov: Tensor) -> tuple[Tensor, Tensor]:
    """SGD with heavy-ball momentum (buffer starting at zero, so its first value is ``g``) and
    per-member Nesterov: ``(new flat, new buffer)``, all ``[K, P]``; columns ``[K, 1]``."""
    buf = buf * momentum + g
    direction = torch.where(nesterov, g + momentum * buf, buf)
    return flat - lr * direction, buf


def _adam(
    flat: Tensor, g: Tensor, m: Tensor, v: Tensor, cols: dict[str, Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's moments and update with bias corrections given as columns ``step_size =
    lr / (1 - beta1^t)`` and ``bc2_sqrt = sqrt(1 - beta2^t)``: ``(flat, exp_avg, exp_avg_sq)``."""
    m = m.lerp(g, 1 - cols["beta1"])
    v = v * cols["beta2"] + g * g * (1 - cols["beta2"])
    return flat - cols["step_size"] * (m / (v.sqrt() / cols["bc2_sqrt"] + eps)), m, v


def _member_losses(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Each member's batch-mean loss ``[K]`` from ``outputs [K, B, C]``, ``targets [K, B]``:
    :func:`sweeps.trial.losses.member_losses` with one formula for every size (its eager shortcuts
    branch on the batch size, which would make a program per branch)."""
    k, b = outputs.shape[:2]
    if loss == "cross_entropy":
        per_sample = torch.nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none")
    else:
        per_sample = half_squared_errors(outputs.flatten(0, 1), targets.flatten(0, 1))
    return per_sample.view(k, b).mean(1)


def _dynamic(tensors: Sequence[Tensor], dim: int) -> None:
    """Compile ``dim`` of ``tensors`` as a dynamic size where it is above 1 (sizes 0 and 1 are
    always specialized), so members leaving or a smaller last batch reuse one program."""
    for t in tensors:
        if t.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _two(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A member axis of 1 doubled (``[1, ...] -> [2, ...]``): one member runs the program of every
    other K, so its bits do not depend on how many members trained beside it (a checkpointed member
    may continue alone or in a population of any size)."""
    return {k: t.expand(2, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t for k, t in tensors.items()}


def make_step_fn(forward: Forward, loss: str, kind: str, layout: tuple[list, list, list], eps: float) -> Callable:
    """The pure step ``(flat, state, x, y, cols) -> (flat, state, losses)``: ``flat [K, P]``,
    ``state`` the optimizer's tensors (``momentum_buffer``, or ``exp_avg`` / ``exp_avg_sq``,
    each ``[K, P]``), ``x [K, B, ...]``, ``y [K, B]``, ``cols`` the ``[K, 1]`` hyperparameters
    (``lr``, ``weight_decay``, ``momentum``, ``nesterov``; for Adam ``beta1``, ``beta2``,
    ``step_size``, ``bc2_sqrt``); ``losses [K]`` are the mini-batch losses before the step."""
    names, sizes, shapes = layout

    def total(flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        losses = _member_losses(loss, forward(_views(flat, names, sizes, shapes), x, False), y)
        return losses.sum(), losses

    grad_and_losses = torch.func.grad_and_value(total, has_aux=True)

    def step(
        flat: Tensor, state: dict[str, Tensor], x: Tensor, y: Tensor, cols: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        grad, (_, losses) = grad_and_losses(flat, x, y)
        if kind == "sgd":
            g = grad + cols["weight_decay"] * flat
            flat, buf = _sgd(flat, g, state["momentum_buffer"], cols["lr"], cols["momentum"], cols["nesterov"])
            return flat, {"momentum_buffer": buf}, losses
        g = grad + cols["weight_decay"] * flat if kind == "adam" else grad
        if kind == "adamw":
            flat = flat * (1 - cols["lr"] * cols["weight_decay"])
        flat, m, v = _adam(flat, g, state["exp_avg"], state["exp_avg_sq"], cols, eps)
        return flat, {"exp_avg": m, "exp_avg_sq": v}, losses

    return step


def make_eval_fn(forward: Forward, loss: str, layout: tuple[list, list, list]) -> Callable:
    """The pure evaluation ``(flat [K, P], x [B, ...], y [B]) -> (losses [K], hits [K])``:
    each member's mean loss and correct predictions on one shared chunk."""
    names, sizes, shapes = layout

    def evaluate(flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = forward(_views(flat, names, sizes, shapes), x, True)
        labels = y.expand(flat.shape[0], -1)
        return _member_losses(loss, out, labels), member_hits(out, labels)

    return evaluate


class CompiledStack:
    """The compiled step and evaluation of one :class:`Stack` (its members may leave; the
    stack's parameters and optimizer state stay the single source of truth).

    :meth:`train_step` and :meth:`evaluate` return ``None`` once compilation has failed (after
    one log line): the caller then runs the eager stack.

    Args:
        stack: the population's stack (models without dropout / batch norm).
        loss: ``"cross_entropy"`` or ``"mse"``.
    """

    #: Whether the full-data evaluations run compiled too (else :meth:`evaluate` returns ``None``).
    evaluations = True

    def __init__(self, stack: Stack, loss: str):
        self.stack = stack
        self.failed = False
        params = stack.params
        layout = (list(params.names), list(params.sizes), list(params.shapes))
        forward = make_forward(stack.models[0], 2)  # the stacked forward, valid for every K
        opt = stack.optimizer
        self.cuda = params.flat.device.type == "cuda"
        options: dict[str, Any] = {"mode": "reduce-overhead"} if self.cuda else {}
        try:
            self._step = torch.compile(make_step_fn(forward, loss, opt.kind, layout, opt.eps), **options)
            self._eval = torch.compile(make_eval_fn(forward, loss, layout), **options)
        except Exception as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self.failed = True
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log.warning("torch.compile failed, training this population eagerly: %s: %s", type(err).__name__, first)

    def _columns(self, lrs: Sequence[float]) -> dict[str, Tensor]:
        opt = self.stack.optimizer
        cols = {"lr": opt.col(lrs), "weight_decay": opt.weight_decay}
        if opt.kind == "sgd":
            return {**cols, "momentum": opt.momentum, "nesterov": opt.nesterov}
        t = opt.steps + 1
        step_size = opt.col([a / (1 - b1**t) for a, (b1, _) in zip(lrs, opt.betas)])
        bc2_sqrt = opt.col([(1 - b2**t) ** 0.5 for _, b2 in opt.betas])
        return {**cols, "beta1": opt.beta1, "beta2": opt.beta2, "step_size": step_size, "bc2_sqrt": bc2_sqrt}

    def _state(self) -> dict[str, Tensor]:
        opt, flat = self.stack.optimizer, self.stack.params.flat
        keys = ("momentum_buffer",) if opt.kind == "sgd" else ("exp_avg", "exp_avg_sq")
        return {k: opt.state[k] if k in opt.state else torch.zeros_like(flat) for k in keys}

    def train_step(self, x: Tensor, y: Tensor, lrs: Sequence[float]) -> Tensor | None:
        """One step of every member on ``x [K, B, ...]``, ``y [K, B]`` with learning rates
        ``lrs``; returns the mini-batch losses ``[K]`` (before the step), or ``None`` (compiling
        failed: nothing was changed, run the eager step)."""
        if self.failed:
            return None
        params, opt = self.stack.params, self.stack.optimizer
        flat = params.flat
        state, cols = self._state(), self._columns(lrs)
        one = len(flat) == 1
        try:
            if one:
                state, cols = _two(state), _two(cols)
                args = _two({"flat": flat, "x": x, "y": y})
                flat_in, x, y = args["flat"], args["x"], args["y"]
            else:
                flat_in = flat
            _dynamic([flat_in, x, y, *state.values(), *cols.values()], 0)
            _dynamic([x, y], 1)
            new, state, losses = self._step(flat_in, state, x, y, cols)
            if one:
                new, losses, state = new[:1], losses[:1], {k: v[:1] for k, v in state.items()}
        except Exception as err:
            self._fail(err)
            return None
        with torch.no_grad():
            flat.copy_(new)
        # CUDA graphs reuse their output memory at the next replay: keep copies
        opt.state.update({k: v.clone() for k, v in state.items()} if self.cuda else state)
        opt.steps += 1
        return losses

    @torch.no_grad()
    def evaluate(self, rows: Sequence[int], x: Tensor, y: Tensor, chunk: int) -> list[tuple[float, float]] | None:
        """``(mean loss, accuracy)`` of the members ``rows`` over ``(x, y)`` in chunks of
        ``chunk`` samples (as :meth:`sweeps.trial.train._Population.evaluate`), or ``None``."""
        if self.failed or not self.evaluations:
            return None
        flat = self.stack.params.flat
        rows = list(rows)
        flat = flat if len(rows) == len(flat) else flat[rows]
        k = len(rows)
        flat = _two({"flat": flat})["flat"]  # one member: the program of every K
        totals, correct = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        try:
            for i in range(0, len(y), chunk):
                part, xs = y[i : i + chunk], x[i : i + chunk]
                _dynamic([flat, xs, part], 0)
                losses, hits = self._eval(flat, xs, part)
                totals += losses[:k].double().cpu() * len(part)
                correct += hits[:k].double().cpu()
        except Exception as err:
            self._fail(err)
            return None
        n = len(y)
        return [(t / n, c / n) for t, c in zip(totals.tolist(), correct.tolist())]


__all__ = ["AUTO_MIN_STEPS", "CompileSetting", "CompiledStack", "make_eval_fn", "make_step_fn", "should_compile"]
