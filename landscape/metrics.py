"""One entry point for every landscape measure: ``measure(model, loss_fn, data, metrics=[...])``.

Each measure is implemented once, in the module it belongs to (``eigen``, ``trace``,
``sharpness``, ``surface``, ...), and listed here by one line in :data:`METRICS`: its name, which
way is sharper, and how to call it on a :class:`MeasureContext`. The context builds shared
objects (the Hessian operator, the functional loss) once per :func:`measure` call.

Add your own with :func:`register_metric`::

    def loss_at_weights(ctx, **options):
        return ctx.model_loss.loss()

    register_metric(Metric("train_loss", "neither", loss_at_weights, "data-set loss"))
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Literal

import torch
from torch import nn

from . import norms, sharpness, surface
from ._functional import LossFn, ModelLoss, ParamSelector
from .hvp import HessianOperator

Orientation = Literal["sharper", "flatter", "neither"]
MetricValue = float | Mapping[str, float]


@dataclass
class MeasureContext:
    """What a metric function gets: the model, loss and data, plus shared, lazily built objects.

    Attributes:
        seed: base seed; every stochastic metric derives its randomness from it.
        init_state: the model's initial ``state_dict`` (for distance-from-init), or ``None``.
        params: parameter selector for curvature (see :class:`~landscape.ModelLoss`).
        dtype: computing dtype for curvature (default: the model's).
        artifacts: non-scalar results (eigenvectors, surfaces, spectra) keyed by metric name;
            filled by metric functions, returned to the caller of :func:`measure` on request.
    """

    model: nn.Module
    loss_fn: LossFn
    data: Any
    seed: int = 0
    init_state: Mapping[str, torch.Tensor] | None = None
    params: ParamSelector = None
    dtype: torch.dtype | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def hessian(self) -> HessianOperator:
        """The data-set Hessian operator, built once per context."""
        return HessianOperator(self.model, self.loss_fn, self.data, params=self.params, dtype=self.dtype)

    @cached_property
    def model_loss(self) -> ModelLoss:
        """The functional data-set loss over the selected parameters, built once per context.

        It is :attr:`hessian` itself (a HessianOperator is a ModelLoss), so curvature and
        sharpness metrics share one snapshot of the weights, one device copy of in-memory data
        and one determinism check.
        """
        return self.hessian


@dataclass(frozen=True)
class Metric:
    """A registered measure.

    Attributes:
        name: key in the result of :func:`measure` (and in MLflow, results DataFrames).
        larger_is: ``"sharper"`` if a larger value means a sharper minimum, ``"flatter"`` for
            the opposite, ``"neither"`` for baselines without that meaning (parameter count).
        fn: ``fn(ctx, **options) -> float | {key: float} | result``; a dict adds several keys,
            each prefixed by nothing (give full names, e.g. ``"surface_2d_curvature"``); a result
            object with a ``.value`` attribute gives that value and is stored as the metric's
            artifact.
        description: one line for tables and the README.
        needs: context fields that must be set (not ``None``), e.g. ``("init_state",)``;
            checked before any metric runs.
    """

    name: str
    larger_is: Orientation
    fn: Callable[..., MetricValue | Any]
    description: str = ""
    needs: tuple[str, ...] = ()


def _top_eig(ctx: MeasureContext, **options: Any) -> float:
    from .eigen import hessian_eigenvalues

    options = {"seed": ctx.seed, **options}
    result = hessian_eigenvalues(ctx.model, ctx.loss_fn, ctx.data, k=1, operator=ctx.hessian, **options)
    ctx.artifacts["hessian_top_eig"] = result
    return float(result.values[0])


def _min_eig(ctx: MeasureContext, **options: Any) -> float:
    from .eigen import hessian_eigenvalues

    options = {"seed": ctx.seed, **options}
    result = hessian_eigenvalues(ctx.model, ctx.loss_fn, ctx.data, k=1, which="smallest", operator=ctx.hessian, **options)
    ctx.artifacts["hessian_min_eig"] = result
    return float(result.values[0])


def _trace(ctx: MeasureContext, **options: Any) -> float:
    from .trace import hessian_trace

    options = {"seed": ctx.seed, **options}
    result = hessian_trace(ctx.model, ctx.loss_fn, ctx.data, operator=ctx.hessian, **options)
    ctx.artifacts["hessian_trace"] = result
    return float(result.value)


def _spectrum(ctx: MeasureContext, **options: Any) -> dict[str, float]:
    from .spectrum import hessian_spectrum

    options = {"seed": ctx.seed, **options}
    result = hessian_spectrum(ctx.model, ctx.loss_fn, ctx.data, operator=ctx.hessian, **options)
    ctx.artifacts["hessian_spectrum"] = result
    return {"hessian_spectrum_trace": float(result.trace_estimate)}


def _bind(fn: Callable[..., Any], shared: str | None = "model_loss", **fixed: Any) -> Callable[..., Any]:
    """A metric function calling ``fn(model, loss_fn, data, seed=..., **fixed, **options)``.

    ``shared="model_loss"`` / ``"operator"`` passes the context's shared ModelLoss / Hessian as
    that keyword, unless the options choose their own ``params`` or ``dtype`` (then they are
    passed on and ``fn`` builds its own). ``fixed`` settings cannot be overridden by options.
    """

    def metric(ctx: MeasureContext, **options: Any) -> Any:
        clash = sorted(set(fixed) & set(options))
        if clash:
            raise ValueError(f"options: {clash} fixed by this metric ({fixed}); use the other variant")
        kwargs = {"seed": ctx.seed, **fixed, **options}
        if shared is not None and not {"params", "dtype"} & set(options):
            kwargs[shared] = ctx.model_loss if shared == "model_loss" else ctx.hessian
        else:
            kwargs = {"params": ctx.params, "dtype": ctx.dtype, **kwargs}
        return fn(ctx.model, ctx.loss_fn, ctx.data, **kwargs)

    metric.target, metric.fixed = fn, fixed  # type: ignore[attr-defined]  # for option checks
    return metric


def _norm(field_name: str) -> Callable[..., float]:
    """A metric function returning one field of :func:`landscape.norms.weight_norms`."""

    def metric(ctx: MeasureContext, **options: Any) -> float:
        return getattr(norms.weight_norms(ctx.model, **{"params": ctx.params, **options}), field_name)

    metric.target = norms.weight_norms  # type: ignore[attr-defined]
    return metric


def _param_count(ctx: MeasureContext, **options: Any) -> float:
    return norms.param_count(ctx.model, **{"params": ctx.params, **options})


def _dist_from_init(ctx: MeasureContext, **options: Any) -> float:
    return norms.distance_from_init(ctx.model, ctx.init_state, **{"params": ctx.params, **options})


_param_count.target = norms.param_count  # type: ignore[attr-defined]
_dist_from_init.target = norms.distance_from_init  # type: ignore[attr-defined]
_S = sharpness

# The list of measures: one line each. Keep names stable: they are MLflow metric keys.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("hessian_top_eig", "sharper", _top_eig, "largest Hessian eigenvalue lambda_max"),
        Metric("hessian_min_eig", "neither", _min_eig, "smallest Hessian eigenvalue (negative near saddles)"),
        Metric("hessian_trace", "sharper", _trace, "Hessian trace (Hutch++)"),
        Metric("hessian_spectrum", "sharper", _spectrum, "SLQ spectral density; scalar: its trace"),
        Metric("keskar_sharpness", "sharper", _bind(_S.keskar_sharpness), "Keskar eps-sharpness (%), box eps(|w|+1), L-BFGS-B"),
        Metric("sharpness_worst", "sharper", _bind(_S.worst_case_sharpness, adaptive=False), "worst-case l2 m-sharpness, c=1"),
        Metric("adaptive_sharpness_worst", "sharper", _bind(_S.worst_case_sharpness, adaptive=True), "worst-case adaptive m-sharpness, c=|w|"),
        Metric("sharpness_avg", "sharper", _bind(_S.average_sharpness, adaptive=False), "average-case Gaussian m-sharpness, c=1"),
        Metric("adaptive_sharpness_avg", "sharper", _bind(_S.average_sharpness, adaptive=True), "average-case adaptive m-sharpness, c=|w|"),
        Metric("pacbayes_flatness", "sharper", _bind(_S.pacbayes_flatness, magnitude_aware=False), "Jiang 1/sigma'^2, plain Gaussian noise"),
        Metric("pacbayes_mag_flatness", "sharper", _bind(_S.pacbayes_flatness, magnitude_aware=True), "Jiang 1/sigma'^2, magnitude-aware noise"),
        Metric("sharpness_flatness", "sharper", _bind(_S.sharpness_flatness, magnitude_aware=False), "Jiang 1/alpha'^2, plain box"),
        Metric("sharpness_mag_flatness", "sharper", _bind(_S.sharpness_flatness, magnitude_aware=True), "Jiang 1/alpha'^2, magnitude-aware box"),
        Metric("filter_curvature", "sharper", _bind(_S.filter_curvature, "operator"), "mean d^T H d, filter-normalized Gaussian d"),
        Metric("adaptive_trace", "sharper", _bind(_S.adaptive_trace, "operator"), "tr(|w| H |w|) (Hutch++)"),
        Metric("surface_1d_curvature", "sharper", _bind(surface.curvature_1d), "quadratic-fit curvature of filter-normalized 1D surfaces"),
        Metric("surface_2d_curvature", "sharper", _bind(surface.curvature_2d), "largest eigenvalue of the quadratic fit to a filter-normalized 2D surface"),
        Metric("surface_2d", "sharper", _bind(partial(surface.curvature_2d, steps=51, span=1.0)), "Li et al. 51 x 51 filter-normalized surface on [-1, 1]^2; scalar: top eigenvalue of its quadratic fit"),
        Metric("flatness_radius", "flatter", _bind(surface.flatness_radius), "step (filter-normalized) at which the loss rises by delta"),
        Metric("param_count", "neither", _param_count, "number of parameters"),
        Metric("frobenius_norm_sum", "neither", _norm("frobenius_sum"), "sum over layers of ||W||_F"),
        Metric("frobenius_norm_prod", "neither", _norm("frobenius_prod"), "product over layers of ||W||_F"),
        Metric("spectral_norm_sum", "neither", _norm("spectral_sum"), "sum over layers of ||W||_2"),
        Metric("spectral_norm_prod", "neither", _norm("spectral_prod"), "product over layers of ||W||_2"),
        Metric("dist_from_init", "neither", _dist_from_init, "||w - w0||_2", needs=("init_state",)),
    ]
}


def register_metric(metric: Metric, *, overwrite: bool = False) -> Metric:
    """Add ``metric`` to :data:`METRICS` so :func:`measure` can compute it by name."""
    if metric.name in METRICS and not overwrite:
        raise ValueError(f"metric {metric.name!r} is already registered; pass overwrite=True to replace it")
    METRICS[metric.name] = metric
    return metric


def measure(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    metrics: Iterable[str] = ("hessian_top_eig", "hessian_trace"),
    *,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    artifacts: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Compute the named measures; return a flat ``{key: float}``.

    For every metric ``name`` the result holds its value(s) and ``"{name}_seconds"``, the wall
    time it took (seconds). ``options[name]`` are keyword arguments for that metric's function.
    Pass a dict as ``artifacts`` to receive the non-scalar results (eigenvectors, surfaces,
    spectra, result objects of the sharpness measures) keyed by metric name. The model is left
    unchanged.

    Raises:
        KeyError: an unknown metric name (the message lists the known ones), or options for a
            metric that is not requested.
        TypeError: an option the metric does not accept (the message lists those it does).
        ValueError: a metric repeated, or one that needs ``init_state`` without it.
    """
    metrics = _check_metrics(metrics)
    options = _check_options(options, metrics)
    ctx = MeasureContext(model, loss_fn, data, seed=seed, init_state=init_state, params=params, dtype=dtype)
    for name in metrics:
        missing = [f for f in METRICS[name].needs if getattr(ctx, f) is None]
        if missing:
            raise ValueError(f"metric {name!r} needs {missing}: pass {missing[0]}=... to measure()")
    out: dict[str, float] = {}
    for name in metrics:
        start = time.perf_counter()
        value = METRICS[name].fn(ctx, **options.get(name, {}))
        if hasattr(value, "value") and not isinstance(value, Mapping):
            ctx.artifacts[name] = value
            value = value.value
        out.update({name: float(value)} if not isinstance(value, Mapping) else {k: float(v) for k, v in value.items()})
        out[f"{name}_seconds"] = time.perf_counter() - start
    if artifacts is not None:
        artifacts.update(ctx.artifacts)
    return out


def check_request(
    metrics: Iterable[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    """Check metric names and options as :func:`measure` does, without computing anything
    (e.g. when a sweep config is loaded); return the metric list. Raises the same errors."""
    metrics = _check_metrics(metrics)
    _check_options(options, metrics)
    return metrics


def _check_metrics(metrics: Iterable[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise KeyError(f"metrics: unknown {unknown}; known metrics are {sorted(METRICS)}")
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise ValueError(f"metrics: {repeated} listed more than once")
    return metrics


# arguments a metric function gets from the MeasureContext, never from options
_CONTEXT_ARGUMENTS = {"model", "loss_fn", "data", "init_state", "operator", "model_loss"}


def _check_options(options: Mapping[str, Mapping[str, Any]] | None, metrics: list[str]) -> dict[str, dict[str, Any]]:
    """``options`` as ``{metric: {keyword: value}}``, checked against the metrics' signatures."""
    options = dict(options or {})
    stray = [m for m in options if m not in metrics]
    if stray:
        raise KeyError(f"options: given for {stray}, which are not in metrics={metrics}")
    for name, opts in options.items():
        if not isinstance(opts, Mapping):
            raise TypeError(f"options[{name!r}]: must be a dict of keyword arguments, got {type(opts).__name__}")
        fixed = getattr(METRICS[name].fn, "fixed", {})
        clash = sorted(set(fixed) & set(opts))
        if clash:
            raise ValueError(f"options[{name!r}]: {clash} fixed by this metric ({fixed}); use the other variant")
        target = getattr(METRICS[name].fn, "target", None)
        if target is None:
            continue
        accepted = {
            p.name for p in inspect.signature(target).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        } - _CONTEXT_ARGUMENTS
        bad = sorted(set(opts) - accepted)
        if bad:
            raise TypeError(f"options[{name!r}]: unknown option(s) {bad}; accepted: {sorted(accepted)}")
    return {name: dict(opts) for name, opts in options.items()}
