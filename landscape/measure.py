"""One entry point for every landscape measure: ``measure(model, loss_fn, data, metrics=[...])``.

Each measure is implemented once, in the module it belongs to (``eigen``, ``trace``,
``sharpness``, ``surface``, ...), and listed here by one line in :data:`METRICS`: its name, which
way is sharper, and how to call it on a :class:`MeasureContext`. The context builds shared
objects (the Hessian operator, the functional loss) once per :func:`measure` call.

Add your own with :func:`register_metric`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from torch import nn

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
        """The functional data-set loss over all parameters, built once per context."""
        return ModelLoss(self.model, self.loss_fn, self.data, dtype=self.dtype)


@dataclass(frozen=True)
class Metric:
    """A registered measure.

    Attributes:
        name: key in the result of :func:`measure` (and in MLflow, results DataFrames).
        larger_is: ``"sharper"`` if a larger value means a sharper minimum, ``"flatter"`` for
            the opposite, ``"neither"`` for baselines without that meaning (parameter count).
        fn: ``fn(ctx, **options) -> float | {key: float}``; a dict adds several keys, each
            prefixed by nothing (give full names, e.g. ``"surface_2d_curvature"``).
        description: one line for tables and the README.
    """

    name: str
    larger_is: Orientation
    fn: Callable[..., MetricValue]
    description: str = ""


def _top_eig(ctx: MeasureContext, **options: Any) -> float:
    from .eigen import hessian_eigenvalues

    result = hessian_eigenvalues(ctx.model, ctx.loss_fn, ctx.data, k=1, operator=ctx.hessian, seed=ctx.seed, **options)
    ctx.artifacts["hessian_top_eig"] = result
    return float(result.values[0])


def _min_eig(ctx: MeasureContext, **options: Any) -> float:
    from .eigen import hessian_eigenvalues

    result = hessian_eigenvalues(
        ctx.model, ctx.loss_fn, ctx.data, k=1, which="smallest", operator=ctx.hessian, seed=ctx.seed, **options
    )
    ctx.artifacts["hessian_min_eig"] = result
    return float(result.values[0])


def _trace(ctx: MeasureContext, **options: Any) -> float:
    from .trace import hessian_trace

    result = hessian_trace(ctx.model, ctx.loss_fn, ctx.data, operator=ctx.hessian, seed=ctx.seed, **options)
    ctx.artifacts["hessian_trace"] = result
    return float(result.value)


def _spectrum(ctx: MeasureContext, **options: Any) -> dict[str, float]:
    from .spectrum import hessian_spectrum

    result = hessian_spectrum(ctx.model, ctx.loss_fn, ctx.data, operator=ctx.hessian, seed=ctx.seed, **options)
    ctx.artifacts["hessian_spectrum"] = result
    return {"hessian_spectrum_trace": float(result.trace_estimate)}


# The list of measures: one line each. Keep names stable: they are MLflow metric keys.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("hessian_top_eig", "sharper", _top_eig, "largest Hessian eigenvalue lambda_max"),
        Metric("hessian_min_eig", "neither", _min_eig, "smallest Hessian eigenvalue (negative near saddles)"),
        Metric("hessian_trace", "sharper", _trace, "Hessian trace (Hutch++)"),
        Metric("hessian_spectrum", "sharper", _spectrum, "SLQ spectral density; scalar: its trace"),
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
    spectra) keyed by metric name. The model is left unchanged.
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise KeyError(f"metrics: unknown {unknown}; known metrics are {sorted(METRICS)}")
    options = dict(options or {})
    stray = [m for m in options if m not in metrics]
    if stray:
        raise KeyError(f"options: given for {stray}, which are not in metrics={metrics}")
    ctx = MeasureContext(model, loss_fn, data, seed=seed, init_state=init_state, params=params, dtype=dtype)
    out: dict[str, float] = {}
    for name in metrics:
        start = time.perf_counter()
        value = METRICS[name].fn(ctx, **options.get(name, {}))
        out.update({name: float(value)} if not isinstance(value, Mapping) else {k: float(v) for k, v in value.items()})
        out[f"{name}_seconds"] = time.perf_counter() - start
    if artifacts is not None:
        artifacts.update(ctx.artifacts)
    return out
