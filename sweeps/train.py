"""Training to convergence, with divergence detection and landscape tracking.

:func:`train` runs the optimizer described by a :class:`~sweeps.config.TrainConfig` on a
:class:`~sweeps.data.Dataset` until the *full training set* reaches ``stop`` (loss at most
``stop.train_loss``, or accuracy at least ``stop.train_acc``), ``max_epochs`` pass (status
``"not_converged"``), or the loss diverges (status ``"diverged"``; not an exception).

Convergence is checked on the full training set in eval mode at the end of every epoch and, once
close (the last full loss, or the running mini-batch loss, within 3x the target; or accuracy
within 0.02), also four times per epoch, so a model is not trained far past the target. In
full-batch mode (``batch_size: full``) every step is checked: the loss of the step is the full
loss at the current weights (when the model has no dropout/batch norm; otherwise an eval-mode
pass is added), and a model that meets the target is not stepped again.

Divergence: a non-finite loss, or a loss above ``divergence_factor`` (default 10) times the
initial full training loss, on a mini-batch or on the full training set.

Losses (both are batch means, as :mod:`landscape` expects):

* ``cross_entropy``: softmax cross-entropy, mean over samples.
* ``mse``: ``1/2 * sum_c (f_c(x) - onehot(y)_c)^2`` per sample (one-hot targets for class
  labels), mean over samples: the convention under which gradient descent is stable for
  ``lambda_max < 2 / lr`` (Cohen et al., 2021).

Tracking: every ``track.every_steps`` optimizer steps (and at step 0) the ``track.metrics`` are
computed with :func:`landscape.measure` on a fixed random subset of ``track.subset`` training
samples (default 512), ``hessian_top_eig`` warm-started from the previous top eigenvector. With
SGD the record also holds ``eos_ratio = lambda_max / ((2 + 2 momentum) / lr)``: 1 is the edge of
stability of (heavy-ball) gradient descent at the current learning rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from landscape._functional import training_mode

from .config import TrainConfig
from .data import Dataset

Status = Literal["converged", "not_converged", "diverged"]
LogFn = Callable[[dict[str, float], int], None]


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_n 1/2 ||f(x_n) - t_n||^2``; integer class labels become one-hot targets."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - targets).pow(2).reshape(len(outputs), -1).sum(-1).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": half_squared_error,
}


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        status: ``"converged"`` (target reached, or ``max_epochs`` done when no target is set),
            ``"not_converged"`` (``max_epochs`` without the target) or ``"diverged"``.
        epochs: epochs started (full-batch: steps); steps: optimizer steps.
        seconds: wall time of training, tracking included; track_seconds: of tracking alone.
        final: the last full evaluation: train_loss, train_acc, test_loss, test_acc.
        history: records in step order: ``kind="epoch"`` (epoch, step, train/test loss and
            accuracy, lr, seconds) and ``kind="track"`` (step, epoch, lr, tracked metrics,
            eos_ratio).
        init_state: the model's ``state_dict`` before the first step (cloned).
        reason: one line on why training stopped.
    """

    status: Status
    epochs: int
    steps: int
    seconds: float
    track_seconds: float
    final: dict[str, float]
    history: list[dict[str, Any]]
    init_state: dict[str, Tensor] = field(repr=False)
    reason: str = ""


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Step -> multiplier of ``cfg.lr``. ``cosine`` anneals to 0 over ``max_epochs``;
    ``warmup_cosine`` first rises linearly over ``warmup_epochs``; ``step`` multiplies by
    ``step_gamma`` at each fraction of ``max_epochs`` in ``step_milestones``."""
    total = cfg.max_epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.schedule == "warmup_cosine" else 0

    def cosine(t: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))

    if cfg.schedule == "constant":
        return lambda t: 1.0
    if cfg.schedule == "step":
        marks = [m * total for m in cfg.step_milestones]
        return lambda t: cfg.step_gamma ** sum(t >= m for m in marks)
    if cfg.schedule == "cosine":
        return cosine
    return lambda t: (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))


def _has_random_or_batch_modules(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)) for m in model.modules())


class _Tracker:
    """Landscape metrics on a fixed subset during training (warm-started top eigenvector)."""

    def __init__(self, cfg: TrainConfig, loss_fn: Callable, x: Tensor, y: Tensor, seed: int):
        gen = torch.Generator().manual_seed(seed + 7919)
        idx = torch.randperm(len(y), generator=gen)[: cfg.track.subset].to(y.device)
        self.batch = (x[idx], y[idx])
        self.cfg, self.loss_fn, self.seed = cfg, loss_fn, seed
        self.v0: Tensor | None = None
        self.seconds = 0.0

    def due(self, step: int) -> bool:
        every = self.cfg.track.every_steps
        return every is not None and step % every == 0 and bool(self.cfg.track.metrics)

    def __call__(self, model: nn.Module, step: int, lr: float) -> dict[str, float]:
        from landscape.metrics import measure

        start = time.perf_counter()
        metrics = self.cfg.track.metrics
        options = {name: dict(opts) for name, opts in self.cfg.track.options.items()}
        if "hessian_top_eig" in metrics and self.v0 is not None:
            options.setdefault("hessian_top_eig", {})["v0"] = self.v0
        artifacts: dict[str, Any] = {}
        values = measure(model, self.loss_fn, self.batch, metrics, seed=self.seed, options=options, artifacts=artifacts)
        values = {k: v for k, v in values.items() if not k.endswith("_seconds")}
        top = artifacts.get("hessian_top_eig")
        if top is not None:
            self.v0 = top.vectors[:, 0]
            if self.cfg.optimizer == "sgd":
                values["eos_ratio"] = values["hessian_top_eig"] / ((2 + 2 * self.cfg.momentum) / lr)
        self.seconds += time.perf_counter() - start
        return values


def _full_batch_gradient(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, chunk: int) -> tuple[float, float]:
    """Accumulate the full-data gradient (chunks weighted by size) into ``.grad``; return the
    ``(loss, accuracy)`` at the current weights in the model's current mode."""
    n, total, correct = len(y), 0.0, 0.0
    for i in range(0, n, chunk):
        out = model(x[i : i + chunk])
        loss = loss_fn(out, y[i : i + chunk])
        (loss * (len(out) / n)).backward()
        total += float(loss.detach()) * len(out)
        correct += float((out.detach().argmax(-1) == y[i : i + chunk]).sum())
    return total / n, correct / n


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    log: LogFn | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (both already on the same device) per ``cfg``.

    ``log(metrics, step)`` is called after every epoch record (train_loss, train_acc,
    test_loss, test_acc, epoch, lr) and every tracking point (tracked metrics, eos_ratio, lr),
    with ``step`` = optimizer steps so far. Mini-batch order is seeded by ``seed``.
    """
    start = time.perf_counter()
    loss_fn = LOSSES[cfg.loss]
    x, y, n = data.x_train, data.y_train, data.n_train
    full = cfg.batch_size == "full"
    batch = n if full else min(int(cfg.batch_size), n)
    steps_per_epoch = math.ceil(n / batch)
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    tracker = _Tracker(cfg, loss_fn, x, y, seed)
    mode_free = not _has_random_or_batch_modules(model)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history: list[dict[str, Any]] = []
    target_loss, target_acc = cfg.stop.train_loss, cfg.stop.train_acc

    def lr_now() -> float:
        return optimizer.param_groups[0]["lr"]

    def reached(loss: float, acc: float) -> bool:
        return (target_loss is not None and loss <= target_loss) or (target_acc is not None and acc >= target_acc)

    def near(train_loss: float, train_acc: float) -> bool:
        return (target_loss is not None and train_loss <= 3 * target_loss) or (
            target_acc is not None and train_acc >= target_acc - 0.02
        )

    def emit(record: dict[str, Any]) -> None:
        history.append(record)
        if log is not None:
            log({k: float(v) for k, v in record.items() if k not in ("kind", "step")}, record["step"])

    def record_epoch(epoch: int, step: int, train_eval: tuple[float, float] | None = None) -> dict[str, float]:
        tr_loss, tr_acc = train_eval or evaluate(model, loss_fn, x, y, cfg.eval_batch_size)
        te_loss, te_acc = evaluate(model, loss_fn, data.x_test, data.y_test, cfg.eval_batch_size)
        rec = {"kind": "epoch", "step": step, "epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc,
               "test_loss": te_loss, "test_acc": te_acc, "lr": lr_now(), "seconds": time.perf_counter() - start}
        emit(rec)
        return rec

    def track(step: int, epoch: int) -> None:
        if tracker.due(step):
            emit({"kind": "track", "step": step, "epoch": epoch, "lr": lr_now(), **tracker(model, step, lr_now())})

    def diverged(loss: float) -> bool:
        return not math.isfinite(loss) or loss > cfg.divergence_factor * init_loss

    last = record_epoch(0, 0)
    init_loss = last["train_loss"]
    track(0, 0)
    step, epoch = 0, 0
    status: Status | None = None
    reason = ""
    if not math.isfinite(init_loss):
        status, reason = "diverged", "the initial loss is not finite"
    elif reached(last["train_loss"], last["train_acc"]):
        status, reason = "converged", "the target was met at initialization"
    checked: tuple[float, float] | None = (last["train_loss"], last["train_acc"])  # full eval at the current weights
    latest = checked  # the most recent full eval
    running = init_loss  # moving average of mini-batch losses
    model.train()
    while status is None and epoch < cfg.max_epochs:
        epoch += 1
        if full:
            optimizer.zero_grad(set_to_none=True)
            checked = _full_batch_gradient(model, loss_fn, x, y, cfg.eval_batch_size)
            if not mode_free:
                checked = evaluate(model, loss_fn, x, y, cfg.eval_batch_size)
            if diverged(checked[0]):
                status, reason = "diverged", f"train loss {checked[0]:.4g} at step {step}"
            elif reached(*checked):
                status, reason = "converged", f"target met at step {step}"
            if status is not None:
                epoch -= 1  # this pass only evaluated
            else:
                optimizer.step()
                schedule.step()
                step, checked = step + 1, None
                track(step, epoch)
        else:
            order = torch.randperm(n, generator=gen).to(y.device)
            check_every = max(1, steps_per_epoch // 4)
            for i in range(steps_per_epoch):
                idx = order[i * batch : (i + 1) * batch]
                optimizer.zero_grad(set_to_none=True)
                loss_t = loss_fn(model(x[idx]), y[idx])
                loss_t.backward()
                optimizer.step()
                schedule.step()
                step, checked = step + 1, None
                loss = float(loss_t.detach())
                if diverged(loss):
                    status, reason = "diverged", f"mini-batch loss {loss:.4g} at step {step}"
                    break
                running = 0.9 * running + 0.1 * loss
                track(step, epoch)
                if i < steps_per_epoch - 1 and (i + 1) % check_every == 0 and (near(*latest) or near(running, 0.0)):
                    checked = latest = evaluate(model, loss_fn, x, y, cfg.eval_batch_size)
                    if reached(*checked):
                        status, reason = "converged", f"target met at step {step}"
                        break
            if status is None:
                checked = latest = evaluate(model, loss_fn, x, y, cfg.eval_batch_size)
                if diverged(checked[0]):
                    status, reason = "diverged", f"train loss {checked[0]:.4g} after epoch {epoch}"
                elif reached(*checked):
                    status, reason = "converged", f"target met after epoch {epoch}"
        if status is None and epoch % cfg.eval_every_epochs == 0:
            record_epoch(epoch, step, checked)
    if status is None:
        status = "converged" if target_loss is None and target_acc is None else "not_converged"
        reason = f"max_epochs={cfg.max_epochs} reached"
    last = history[-1]
    if not (last["kind"] == "epoch" and last["step"] == step and last["epoch"] == epoch):
        last = record_epoch(epoch, step, checked)
    final = {k: last[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    return TrainResult(
        status=status, epochs=epoch, steps=step, seconds=time.perf_counter() - start,
        track_seconds=tracker.seconds, final=final, history=history, init_state=init_state, reason=reason,
    )
