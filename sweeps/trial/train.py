"""Training to convergence, with divergence detection and landscape tracking.

:func:`train` runs the optimizer described by a :class:`~sweeps.spec.config.TrainConfig` on a
:class:`~sweeps.trial.data.Dataset` until the *full training set* reaches ``stop`` (loss at most
``stop.train_loss``, or accuracy at least ``stop.train_acc``), ``max_epochs`` pass (status
``"not_converged"``), or the loss diverges (status ``"diverged"``; not an exception).

:func:`train_population` trains K models of one shape (see :mod:`sweeps.trial.population`) as one
stack, each member by its own config and seed and by exactly the rules below; a member leaves
the stack (and is reported through a callback) the moment it stops. :func:`train` is the
population of one: there is one training loop.

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

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..spec.config import TrainConfig
from ..spec.status import TrialStatus
from . import checkpoint as checkpoints
from .compiled_step import CompiledStack, CompileSetting, should_compile
from .data import Dataset
from .epochs import EpochSteps
from .losses import (  # noqa: F401  (importable from here as before)
    LOSSES,
    _cross_entropies,
    evaluate,
    half_squared_error,
    half_squared_errors,
    member_hits,
    member_losses,
)
from .population import SHARED_TRAIN_FIELDS, Stack, module_stack_reason

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        status: a :class:`~sweeps.spec.status.TrialStatus`: ``converged`` (target reached, or
            ``max_epochs`` done when no target is set), ``not_converged`` (``max_epochs`` without
            the target), ``diverged`` or ``pruned`` (stopped by :func:`train_population`'s ``stop``).
        epochs: epochs started (full-batch: steps); steps: optimizer steps.
        seconds: wall time of training, tracking included (in a population: from its start to
            this member's exit); track_seconds: of this member's tracking alone.
        final: the last full evaluation: train_loss, train_acc, test_loss, test_acc.
        history: records in step order: ``kind="epoch"`` (epoch, step, train/test loss and
            accuracy, lr, seconds) and ``kind="track"`` (step, epoch, lr, tracked metrics,
            eos_ratio).
        init_state: the model's ``state_dict`` before the first step (cloned).
        reason: one line on why training stopped.
        resumes: times this training continued from a checkpoint (:mod:`sweeps.trial.checkpoint`);
            ``seconds`` then counts the training time up to each checkpoint plus the last run's.
    """

    status: TrialStatus
    epochs: int
    steps: int
    seconds: float
    track_seconds: float
    final: dict[str, float]
    history: list[dict[str, Any]]
    init_state: dict[str, Tensor] = field(repr=False)
    reason: str = ""
    resumes: int = 0


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
    return lambda t: (
        (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))
    )


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


@dataclass(frozen=True)
class TrainingRecord:
    """One record of training as it is streamed: an epoch's evaluation or a tracking point.

    Attributes:
        kind: ``"epoch"`` (train/test loss and accuracy, epoch, lr, seconds) or ``"track"``
            (the tracked landscape metrics' keys, ``eos_ratio`` for ``hessian_top_eig`` with
            SGD, epoch, lr).
        step: optimizer steps so far.
        values: the record's numbers (``kind`` and ``step`` not repeated).
    """

    kind: Literal["epoch", "track"]
    step: int
    values: dict[str, float]


LogMemberFn = Callable[[int, TrainingRecord], None]
ResultFn = Callable[[int, TrainResult], None]
StopFn = Callable[[int], "str | None"]


@dataclass(eq=False)
class _Member:
    """One model of a population: its config, data order, tracker and records."""

    index: int
    model: nn.Module
    cfg: TrainConfig
    gen: torch.Generator
    tracker: _Tracker
    factor: Callable[[int], float]
    init_state: dict[str, Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    init_loss: float = math.nan
    running: float = math.nan  # moving average of mini-batch losses
    latest: tuple[float, float] = (math.nan, 0.0)  # the most recent full eval
    checked: tuple[float, float] | None = None  # full eval at the current weights
    resumes: int = 0  # times continued from a checkpoint

    def lr(self, step: int) -> float:
        return self.cfg.lr * self.factor(step)

    def reached(self, loss: float, acc: float) -> bool:
        stop = self.cfg.stop
        return (stop.train_loss is not None and loss <= stop.train_loss) or (
            stop.train_acc is not None and acc >= stop.train_acc
        )

    def near(self, loss: float, acc: float) -> bool:
        stop = self.cfg.stop
        return (stop.train_loss is not None and loss <= 3 * stop.train_loss) or (
            stop.train_acc is not None and acc >= stop.train_acc - 0.02
        )

    def diverged(self, loss: float) -> bool:
        return not math.isfinite(loss) or loss > self.cfg.divergence_factor * self.init_loss


class _Population(EpochSteps):
    """The training loop of :func:`train_population` over the live members (stack rows)."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        data: Dataset,
        cfgs: Sequence[TrainConfig],
        seeds: Sequence[int],
        log: LogMemberFn | None,
        on_result: ResultFn | None,
        stop: StopFn | None = None,
        checkpoint_paths: Sequence[Path] | None = None,
        compile: CompileSetting = "auto",
    ):
        self.start = time.perf_counter()
        self.data, self.log, self.on_result, self.stop = data, log, on_result, stop
        cfg = cfgs[0]
        self.eval_batch = cfg.eval_batch_size
        self.full = cfg.batch_size == "full"
        n = data.n_train
        self.batch = n if self.full else min(int(cfg.batch_size), n)
        self.steps_per_epoch = math.ceil(n / self.batch)
        self.mode_free = not _has_random_or_batch_modules(models[0])
        self.live = [
            _Member(
                i,
                model,
                c,
                torch.Generator().manual_seed(seed),
                _Tracker(c, LOSSES[c.loss], data.x_train, data.y_train, seed),
                lr_factor(c, self.steps_per_epoch),
                {k: v.detach().clone() for k, v in model.state_dict().items()},
            )
            for i, (model, c, seed) in enumerate(zip(models, cfgs, seeds))
        ]
        self.stack = Stack(models, cfgs)
        self.loss_fn = functools.partial(member_losses, cfg.loss)
        most_steps = max(c.max_epochs for c in cfgs) * self.steps_per_epoch
        compiling = should_compile(compile, most_steps, self.mode_free, self.full)
        self.compiled = CompiledStack(self.stack, cfg.loss) if compiling else None
        self.results: list[TrainResult | None] = [None] * len(models)
        self.pending: dict[int, tuple[TrialStatus, str, int]] = {}  # row -> how it leaves
        self.step = 0
        self.saver = checkpoints.Cadence(cfg.checkpoint, checkpoint_paths)
        self.resumed: tuple[int, int | None, Tensor | None] | None = None  # epoch, next batch, orders (restore)

    # --- evaluations ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: Sequence[int], x: Tensor, y: Tensor) -> list[tuple[float, float]]:
        """``(mean loss, accuracy)`` over ``(x, y)`` of the members ``rows``, in eval mode, in
        chunks of ``eval_batch_size / len(rows)`` samples (the memory of one model's chunk)."""
        if not rows:
            return []
        k = len(rows)
        chunk = max(1, self.eval_batch // k)
        if self.compiled is not None and (done := self.compiled.evaluate(rows, x, y, chunk)) is not None:
            return done
        totals, correct = [0.0] * k, [0.0] * k
        for i in range(0, len(y), chunk):
            out = self.stack.outputs(rows, x[i : i + chunk])
            part = y[i : i + chunk].expand(k, -1)
            losses, hits = self.loss_fn(out, part).tolist(), member_hits(out, part).tolist()
            totals = [t + l * part.shape[1] for t, l in zip(totals, losses)]
            correct = [c + h for c, h in zip(correct, hits)]
        return [(t / len(y), c / len(y)) for t, c in zip(totals, correct)]

    def record(self, rows: Sequence[int], epoch: int) -> None:
        """An epoch record for each member of ``rows`` (their train eval reused when current)."""
        need = [r for r in rows if self.live[r].checked is None]
        fresh = dict(zip(need, self.evaluate(need, self.data.x_train, self.data.y_train)))
        tests = self.evaluate(rows, self.data.x_test, self.data.y_test)
        for row, (te_loss, te_acc) in zip(rows, tests):
            m = self.live[row]
            tr_loss, tr_acc = m.checked if m.checked is not None else fresh[row]
            self.emit(
                m,
                {
                    "kind": "epoch",
                    "step": self.step,
                    "epoch": epoch,
                    "train_loss": tr_loss,
                    "train_acc": tr_acc,
                    "test_loss": te_loss,
                    "test_acc": te_acc,
                    "lr": m.lr(self.step),
                    "seconds": time.perf_counter() - self.start,
                },
            )

    def emit(self, m: _Member, record: dict[str, Any]) -> None:
        m.history.append(record)
        self._send(m, record)

    def _send(self, m: _Member, record: dict[str, Any]) -> None:
        if self.log is not None:
            values = {k: float(v) for k, v in record.items() if k not in ("kind", "step")}
            self.log(m.index, TrainingRecord(record["kind"], record["step"], values))

    def track(self, epoch: int) -> None:
        every = self.live[0].cfg.track.every_steps  # shared by the members
        if every is None or self.step % every:
            return
        for row, m in enumerate(self.live):
            if row not in self.pending and m.tracker.due(self.step):
                self.stack.write_to(row)
                lr = m.lr(self.step)
                self.emit(
                    m,
                    {"kind": "track", "step": self.step, "epoch": epoch, "lr": lr, **m.tracker(m.model, self.step, lr)},
                )

    # --- leaving the stack ----------------------------------------------------------------
    def leave(self, row: int, status: TrialStatus, reason: str, epoch: int) -> None:
        self.pending.setdefault(row, (status, reason, epoch))

    def settle(self) -> list[int] | None:
        """Finish the pending members (final record, weights into their model, callback) and
        re-stack the others; return the kept rows, or ``None`` if nobody left."""
        if not self.pending:
            return None
        for row in sorted(self.pending):
            self._finish(row, *self.pending[row])
        keep = [r for r in range(len(self.live)) if r not in self.pending]
        self.pending.clear()
        self.stack.take(keep)
        self.live = [self.live[r] for r in keep]
        return keep

    def _finish(self, row: int, status: TrialStatus, reason: str, epoch: int) -> None:
        m = self.live[row]
        self.stack.write_to(row)
        last = m.history[-1]
        if not (last["kind"] == "epoch" and last["step"] == self.step and last["epoch"] == epoch):
            self.record([row], epoch)
        last = m.history[-1]
        result = TrainResult(
            status=status,
            epochs=epoch,
            steps=self.step,
            seconds=time.perf_counter() - self.start,
            track_seconds=m.tracker.seconds,
            final={k: last[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
            history=m.history,
            init_state=m.init_state,
            reason=reason,
            resumes=m.resumes,
        )
        self.results[m.index] = result
        if self.on_result is not None:
            self.on_result(m.index, result)

    def stop_requested(self, epoch: int) -> None:
        """Members whose ``stop(index)`` gives a reason leave as ``pruned`` (after an epoch)."""
        if self.stop is None:
            return
        for row, m in enumerate(self.live):
            if row not in self.pending and (reason := self.stop(m.index)):
                self.leave(row, TrialStatus.PRUNED, reason, epoch)

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> list[TrainResult]:
        if self.resumed is None:
            epoch = self._start()
        else:
            epoch, batch, orders = self.resumed
            for member in self.live:  # the curve so far, again
                for record in member.history:
                    self._send(member, record)
            if batch is not None:  # stopped inside epoch `epoch`: finish it
                self._mini_batch_epoch(epoch, batch, orders)
                self._end_epoch(epoch)
        while self.live:
            epoch += 1
            (self._full_batch_epoch if self.full else self._mini_batch_epoch)(epoch)
            self._end_epoch(epoch)
        return self.results  # type: ignore[return-value]

    def _start(self) -> int:
        """Epoch 0: the initial evaluation, tracking and checks; returns 0."""
        self.record(range(len(self.live)), 0)
        for m in self.live:
            m.init_loss = m.running = m.history[-1]["train_loss"]
            m.checked = m.latest = (m.init_loss, m.history[-1]["train_acc"])
        self.track(0)
        for row, m in enumerate(self.live):
            assert m.checked is not None
            if not math.isfinite(m.init_loss):
                self.leave(row, TrialStatus.DIVERGED, "the initial loss is not finite", 0)
            elif m.reached(*m.checked):
                self.leave(row, TrialStatus.CONVERGED, "the target was met at initialization", 0)
        self.settle()
        return 0

    def _end_epoch(self, epoch: int) -> None:
        """After an epoch's steps: its records, ``max_epochs``, pruning, leaving, checkpoint."""
        rows = [r for r, m in enumerate(self.live) if epoch % m.cfg.eval_every_epochs == 0]
        self.record(rows, epoch)
        for row, m in enumerate(self.live):
            if epoch >= m.cfg.max_epochs:
                no_target = m.cfg.stop.train_loss is None and m.cfg.stop.train_acc is None
                status = TrialStatus.CONVERGED if no_target else TrialStatus.NOT_CONVERGED
                self.leave(row, status, f"max_epochs={m.cfg.max_epochs} reached", epoch)
        self.stop_requested(epoch)
        self.settle()
        if self.saver.due(epoch, epoch_end=True):
            checkpoints.capture(self, epoch, None, None)


def train_population(
    models: Sequence[nn.Module],
    data: Dataset,
    cfgs: Sequence[TrainConfig],
    *,
    seeds: Sequence[int],
    log: LogMemberFn | None = None,
    on_result: ResultFn | None = None,
    stop: StopFn | None = None,
    checkpoint_paths: Sequence[Path] | None = None,
    resume: Sequence[dict[str, Any]] | None = None,
    compile: CompileSetting = "auto",
) -> list[TrainResult]:
    """Train K models of one shape as one stack, each by its own config; :func:`train` is K = 1.

    Each member follows exactly the rules of :func:`train` (its optimizer hyperparameters,
    schedule, stop target, max_epochs, divergence factor, data order seeded by its seed). A
    member that converges, diverges or reaches its max_epochs leaves the stack at once: its
    weights are copied into its model (trained in place), and ``on_result(index, result)`` is
    called before the others go on. ``log(index, record)`` streams each member's epoch and
    tracking records (:class:`TrainingRecord`). ``stop(index)``, asked after each epoch, returns a reason to stop
    that member now (it leaves as ``"pruned"``) or ``None``: per-member pruning.

    Args:
        models: K modules with the same parameter names and shapes, on ``data``'s device;
            K > 1 needs models without batch norm or dropout (see
            :func:`sweeps.trial.population.module_stack_reason`).
        cfgs: one per model, equal in :data:`sweeps.trial.population.SHARED_TRAIN_FIELDS`.
        seeds: mini-batch order (and tracking subset) seed per model.
        checkpoint_paths: one file per model where it checkpoints (:mod:`sweeps.trial.checkpoint`)
            as ``cfgs[0].checkpoint`` says; ``None``: no checkpoints.
        resume: one loaded checkpoint per model (:func:`sweeps.trial.checkpoint.load`), all at one
            position: training continues from there exactly (the models are built as for a
            start; their weights and every state are replaced). Each member's ``log`` first
            receives its records so far again.
        compile: ``resources.compile``: ``True`` runs each mini-batch step and evaluation as one
            compiled program (:mod:`sweeps.trial.compiled_step`; falls back to eager with one log
            line), ``False`` never, ``"auto"`` (default) when the members may take at least
            :data:`sweeps.trial.compiled_step.AUTO_MIN_STEPS` steps. Never for full batch or for models
            with dropout / batch norm.

    Returns:
        The members' :class:`TrainResult`, in the order of ``models``. A member's ``seconds``
        is the wall time from the population's start to its exit.
    """
    if not (len(models) == len(cfgs) == len(seeds) >= 1):
        raise ValueError(
            f"need as many models, cfgs and seeds, at least one (got {len(models)}, {len(cfgs)}, {len(seeds)})"
        )
    shared = [c.model_dump(include=set(SHARED_TRAIN_FIELDS)) for c in cfgs]
    for i, s in enumerate(shared[1:], 1):
        diff = sorted(k for k in s if s[k] != shared[0][k])
        if diff:
            raise ValueError(
                f"cfgs[{i}].{diff[0]}: differs from cfgs[0] (a population shares {', '.join(SHARED_TRAIN_FIELDS)})"
            )
    if len(models) > 1:
        reason = module_stack_reason(models[0])
        if reason is not None:
            raise ValueError(f"these models do not stack: {reason}")
    if checkpoint_paths is not None and len(checkpoint_paths) != len(models):
        raise ValueError(f"checkpoint_paths: need one per model (got {len(checkpoint_paths)} for {len(models)})")
    if resume is not None and len(resume) != len(models):
        raise ValueError(f"resume: need one checkpoint per model (got {len(resume)} for {len(models)})")
    population = _Population(models, data, cfgs, seeds, log, on_result, stop, checkpoint_paths, compile)
    if resume is not None:
        checkpoints.restore(population, resume)
    return population.run()


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    log: LogFn | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (both already on the same device) per ``cfg``: a
    population of one (:func:`train_population`).

    ``log(metrics, step)`` is called after every epoch record (train_loss, train_acc,
    test_loss, test_acc, epoch, lr) and every tracking point (tracked metrics, eos_ratio, lr),
    with ``step`` = optimizer steps so far. Mini-batch order is seeded by ``seed``.
    """
    member_log = None if log is None else (lambda _, record: log(record.values, record.step))
    return train_population([model], data, [cfg], seeds=[seed], log=member_log)[0]
