"""One entry point for every landscape measure: ``measure(model, loss_fn, data, metrics=[...])``.

Each measure is implemented once, in the module it belongs to (``eigen``, ``trace``,
``curvature``, ``sharpness``, ``surface_measures``, ...), and listed here by one line in
:data:`METRICS`: its name, which way is sharper, and an :class:`Adapter` that calls it on a
:class:`MeasureContext`. Every :class:`Metric` declares the options it accepts
(:attr:`Metric.options`, read off the signature of the function that receives them) and the
keys it reports (:attr:`Metric.keys`), so :func:`check_request` rejects a misspelled option
before anything runs and callers know the result keys without computing. The context builds
shared objects (the Hessian operator, the functional loss) once per :func:`measure` call.

Add your own with :func:`register_metric`; its options are the keywords of ``fn`` after the
context::

    def loss_at_weights(ctx, *, scale=1.0):
        return scale * ctx.model_loss.loss()

    register_metric(Metric("train_loss", "neither", loss_at_weights, "data-set loss"))
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from operator import attrgetter
from typing import Any, Literal

import torch
from torch import nn

from . import curvature, eigen, generalization, ggn, norms, sharpness, spectrum, surface_measures, trace
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
    shared: dict[Any, Any] = field(default_factory=dict, repr=False)

    def pacbayes_sigma(self, magnitude_aware: bool, **options: Any) -> sharpness.FlatnessResult:
        """The :func:`landscape.pacbayes_flatness` result for this noise kind and options, searched
        once per context: ``pacbayes_flatness`` and the PAC-Bayes bounds derived from the same
        sigma share one bisection."""
        key = ("pacbayes_sigma", bool(magnitude_aware), repr(sorted(options.items())))
        if key not in self.shared:
            adapter = Adapter(sharpness.pacbayes_flatness, {"magnitude_aware": bool(magnitude_aware)})
            self.shared[key] = adapter(self, **options).result
        return self.shared[key]

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


# arguments a metric function gets from the MeasureContext, never from options
CONTEXT_ARGUMENTS = frozenset({"model", "loss_fn", "data", "init_state", "operator", "model_loss"})
# options that choose how the functional loss is built: given one, a function builds its own
# instead of receiving the context's shared ModelLoss / HessianOperator
BUILD_OPTIONS = frozenset({"params", "dtype", "train_mode", "backend"})


def keyword_parameters(fn: Callable[..., Any], *, skip: int = 0) -> tuple[str, ...] | None:
    """Names ``fn`` accepts as keywords after its first ``skip`` parameters, in signature order;
    ``None`` when it also takes ``**kwargs`` (then any name is accepted)."""
    parameters = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


@dataclass(frozen=True)
class Reading:
    """What an :class:`Adapter` returns: the scalar(s) for :func:`measure` and the full result
    to keep as the metric's artifact (``None``: nothing to keep)."""

    value: MetricValue
    result: Any


@dataclass(frozen=True)
class Adapter:
    """A metric function that calls a library function on a :class:`MeasureContext`.

    ``target``'s parameters named in :data:`CONTEXT_ARGUMENTS` are filled from the context
    (``operator`` / ``model_loss`` get the context's shared objects unless an option is one of
    :data:`BUILD_OPTIONS`; ``params`` / ``dtype`` default to the context's); ``fixed`` settings
    are passed as given and cannot be overridden, ``defaults`` can; every other keyword of
    ``target`` is an option. ``read`` turns the result into the reported scalar(s) (default:
    ``result.value``); the result is kept as the metric's artifact if ``artifact``.
    """

    target: Callable[..., Any]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    read: Callable[[Any], MetricValue] = attrgetter("value")
    defaults: Mapping[str, Any] = field(default_factory=dict)
    artifact: bool = True

    @property
    def options(self) -> tuple[str, ...]:
        """The option names ``target`` accepts (its keywords less context and fixed ones)."""
        names = keyword_parameters(self.target) or ()
        return tuple(n for n in names if n not in CONTEXT_ARGUMENTS and n not in self.fixed)

    def __call__(self, ctx: MeasureContext, **options: Any) -> Reading:
        accepted = set(keyword_parameters(self.target) or ())
        context = {
            "model": ctx.model,
            "loss_fn": ctx.loss_fn,
            "data": ctx.data,
            "init_state": ctx.init_state,
            "params": ctx.params,
            "dtype": ctx.dtype,
            "seed": ctx.seed,
        }
        if accepted & {"operator", "model_loss"} and not BUILD_OPTIONS & set(options):
            # the shared operator / loss already holds the parameter selection and dtype
            context.update(operator=ctx.hessian, model_loss=ctx.model_loss, params=None, dtype=None)
        kwargs = {n: v for n, v in context.items() if n in accepted}
        result = self.target(**{**kwargs, **self.defaults, **options, **self.fixed})
        return Reading(self.read(result), result if self.artifact else None)


@dataclass(frozen=True)
class Metric:
    """A registered measure, with what it accepts and what it reports.

    Attributes:
        name: key in the result of :func:`measure` (and in MLflow, results DataFrames).
        larger_is: ``"sharper"`` if a larger value means a sharper minimum, ``"flatter"`` for
            the opposite, ``"neither"`` for baselines without that meaning (parameter count).
        fn: ``fn(ctx, **options)`` returning a float, a ``{key: float}`` dict (full key names,
            e.g. ``"hessian_spectrum_trace"``), a result object with a ``.value`` attribute
            (that value is reported and the object kept as the metric's artifact), or a
            :class:`Reading`; an :class:`Adapter` for library functions.
        description: one line for tables and the documentation's metric table.
        needs: context fields that must be set (not ``None``), e.g. ``("init_state",)``;
            checked before any metric runs.
        keys: the keys the metric adds to the result of :func:`measure` besides
            ``"{name}_seconds"``. Default ``(name,)``.
        options: the option names ``fn`` accepts. Default: an Adapter's options, else the
            keywords of ``fn`` after the context argument; ``None`` when ``fn`` takes
            ``**options`` and none are declared (then any name passes).
        fixed: settings the metric fixes (an Adapter's ``fixed``); naming one as an option is
            an error that points to the other variant.
        unit: the unit of the value (e.g. ``"loss/param^2"``, ``"log"``), for tables.
        reference: where the definition comes from (paper, equation), for tables.
    """

    name: str
    larger_is: Orientation
    fn: Callable[..., Any]
    description: str = ""
    needs: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    options: tuple[str, ...] | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    unit: str = ""
    reference: str = ""

    def __post_init__(self) -> None:
        if self.larger_is not in ("sharper", "flatter", "neither"):
            raise ValueError(f"larger_is: must be 'sharper', 'flatter' or 'neither' (got {self.larger_is!r})")
        set_ = partial(object.__setattr__, self)
        set_("keys", tuple(self.keys) or (self.name,))
        if isinstance(self.fn, Adapter):
            set_("fixed", {**self.fn.fixed, **self.fixed})
            if self.options is None:
                set_("options", self.fn.options)
        elif self.options is None:
            set_("options", keyword_parameters(self.fn, skip=1))
        if self.options is not None:
            set_("options", tuple(self.options))


def _eigenvalue(result: Any) -> float:
    return float(result.values[0])


def _norm(field_name: str) -> Adapter:
    """One field of :func:`landscape.norms.weight_norms` as a metric."""
    return Adapter(norms.weight_norms, read=attrgetter(field_name), artifact=False)


def _spectrum_trace(result: Any) -> dict[str, float]:
    return {"hessian_spectrum_trace": float(result.trace_estimate)}


def _identity(value: Any) -> Any:
    return value


def _layer_norm(field_name: str, factor: float = 1.0) -> Adapter:
    """``factor`` times one field of :func:`landscape.generalization.layer_norms` (the weight
    norms with batch norm folded, as Jiang et al.'s measures are computed)."""
    return Adapter(generalization.layer_norms, read=lambda r: factor * getattr(r, field_name), artifact=False)


def _value(target: Callable[..., Any], fixed: Mapping[str, Any] | None = None) -> Adapter:
    """A library function that returns the reported float itself (nothing kept as artifact)."""
    return Adapter(target, dict(fixed or {}), read=_identity, artifact=False)


_PACBAYES_OPTIONS = Adapter(sharpness.pacbayes_flatness, {"magnitude_aware": True}).options


def _pacbayes_flatness(magnitude_aware: bool) -> Callable[..., Any]:
    """``1/sigma'^2`` through :meth:`MeasureContext.pacbayes_sigma` (one search per context)."""

    def pacbayes_flatness(ctx: MeasureContext, **options: Any) -> Any:
        return ctx.pacbayes_sigma(magnitude_aware, **options)

    return pacbayes_flatness


def _pacbayes_bound(magnitude_aware: bool, which: str) -> Callable[..., Any]:
    """One of :func:`landscape.generalization.pacbayes_bounds` from the context's sigma."""

    def pacbayes_bound(ctx: MeasureContext, **options: Any) -> Reading:
        flat = ctx.pacbayes_sigma(magnitude_aware, **options)
        bounds = generalization.pacbayes_bounds(
            flat, ctx.model, ctx.init_state, params=options.get("params", ctx.params)
        )
        return Reading(getattr(bounds, which), bounds)

    return pacbayes_bound


_S, _G = sharpness, generalization
_PLAIN, _MAG = {"magnitude_aware": False}, {"magnitude_aware": True}
_JIANG = "Jiang et al. 2020"
_top_eig = Adapter(eigen.hessian_eigenvalues, {"k": 1, "which": "largest"}, _eigenvalue)
_min_eig = Adapter(eigen.hessian_eigenvalues, {"k": 1, "which": "smallest"}, _eigenvalue)

# The list of measures: one line each. Keep names stable: they are MLflow metric keys.
# One line per metric: the registry reads as a table.
# fmt: off
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("hessian_top_eig", "sharper", _top_eig, "largest Hessian eigenvalue lambda_max", unit="loss/param^2", reference="Lanczos 1950; Yao et al. 2020 (PyHessian)"),
        Metric("hessian_min_eig", "neither", _min_eig, "smallest Hessian eigenvalue (negative near saddles)", unit="loss/param^2", reference="Lanczos 1950"),
        Metric("hessian_trace", "sharper", Adapter(trace.hessian_trace), "Hessian trace (Hutch++)", unit="loss/param^2", reference="Meyer et al. 2021 (Hutch++)"),
        Metric("hessian_spectrum", "sharper", Adapter(spectrum.hessian_spectrum, read=_spectrum_trace),
               "SLQ spectral density; scalar: its trace", keys=("hessian_spectrum_trace",), unit="loss/param^2", reference="Lin et al. 2016; Ghorbani et al. 2019"),
        Metric("keskar_sharpness", "sharper", Adapter(_S.keskar_sharpness), "Keskar eps-sharpness (%), box eps(|w|+1), L-BFGS-B", unit="%", reference="Keskar et al. 2017"),
        Metric("sharpness_worst", "sharper", Adapter(_S.worst_case_sharpness, {"adaptive": False}), "worst-case l2 m-sharpness, c=1", unit="loss", reference="Andriushchenko et al. 2023"),
        Metric("adaptive_sharpness_worst", "sharper", Adapter(_S.worst_case_sharpness, {"adaptive": True}), "worst-case adaptive m-sharpness, c=|w|", unit="loss", reference="Andriushchenko et al. 2023; Kwon et al. 2021"),
        Metric("sharpness_avg", "sharper", Adapter(_S.average_sharpness, {"adaptive": False}), "average-case Gaussian m-sharpness, c=1", unit="loss", reference="Andriushchenko et al. 2023"),
        Metric("adaptive_sharpness_avg", "sharper", Adapter(_S.average_sharpness, {"adaptive": True}), "average-case adaptive m-sharpness, c=|w|", unit="loss", reference="Andriushchenko et al. 2023"),
        Metric("pacbayes_flatness", "sharper", _pacbayes_flatness(False), "Jiang 1/sigma'^2, plain Gaussian noise", options=_PACBAYES_OPTIONS, fixed=_PLAIN, unit="1/param^2", reference=f"{_JIANG} eq. 53"),
        Metric("pacbayes_mag_flatness", "sharper", _pacbayes_flatness(True), "Jiang 1/sigma'^2, magnitude-aware noise", options=_PACBAYES_OPTIONS, fixed=_MAG, unit="1", reference=f"{_JIANG} eq. 61"),
        Metric("pacbayes_init", "sharper", _pacbayes_bound(False, "init"), "PAC-Bayes bound ||w-w0||^2/(4 sigma^2) + log(m/sigma) + 10 (weights only), sigma of pacbayes_flatness", needs=("init_state",), options=_PACBAYES_OPTIONS, fixed=_PLAIN, unit="1", reference=f"{_JIANG} eq. 48"),
        Metric("pacbayes_orig", "sharper", _pacbayes_bound(False, "orig"), "PAC-Bayes bound ||w||^2/(4 sigma^2) + log(m/sigma) + 10 (weights only), sigma of pacbayes_flatness", options=_PACBAYES_OPTIONS, fixed=_PLAIN, unit="1", reference=f"{_JIANG} eq. 49"),
        Metric("pacbayes_mag_init", "sharper", _pacbayes_bound(True, "init"), "magnitude-aware PAC-Bayes bound from w - w0, sigma' of pacbayes_mag_flatness", needs=("init_state",), options=_PACBAYES_OPTIONS, fixed=_MAG, unit="1", reference=f"{_JIANG} eq. 56"),
        Metric("pacbayes_mag_orig", "sharper", _pacbayes_bound(True, "orig"), "magnitude-aware PAC-Bayes bound from w (denominator from w - w0), sigma' of pacbayes_mag_flatness", needs=("init_state",), options=_PACBAYES_OPTIONS, fixed=_MAG, unit="1", reference=f"{_JIANG} eq. 57"),
        Metric("sharpness_flatness", "sharper", Adapter(_S.sharpness_flatness, {"magnitude_aware": False}), "Jiang 1/alpha'^2, plain box", unit="1/param^2", reference="Jiang et al. 2020"),
        Metric("sharpness_mag_flatness", "sharper", Adapter(_S.sharpness_flatness, {"magnitude_aware": True}), "Jiang 1/alpha'^2, magnitude-aware box", unit="1", reference="Jiang et al. 2020"),
        Metric("filter_curvature", "sharper", Adapter(curvature.filter_curvature), "mean d^T H d, filter-normalized Gaussian d", unit="loss", reference="Li et al. 2018"),
        Metric("adaptive_trace", "sharper", Adapter(curvature.adaptive_trace), "tr(|w| H |w|) (Hutch++)", unit="loss", reference="Kwon et al. 2021"),
        Metric("surface_1d_curvature", "sharper", Adapter(surface_measures.curvature_1d), "quadratic-fit curvature of filter-normalized 1D surfaces", unit="loss", reference="Li et al. 2018"),
        Metric("surface_2d_curvature", "sharper", Adapter(surface_measures.curvature_2d), "largest eigenvalue of the quadratic fit to a filter-normalized 2D surface", unit="loss", reference="Li et al. 2018"),
        Metric("surface_2d", "sharper", Adapter(surface_measures.curvature_2d, defaults={"steps": 51, "span": 1.0}), "Li et al. 51 x 51 filter-normalized surface on [-1, 1]^2; scalar: top eigenvalue of its quadratic fit", unit="loss", reference="Li et al. 2018"),
        Metric("flatness_radius", "flatter", Adapter(surface_measures.flatness_radius), "step (filter-normalized) at which the loss rises by delta", unit="1 (filter-normalized step)", reference="Li et al. 2018"),
        Metric("param_count", "neither", Adapter(norms.param_count, read=_identity, artifact=False), "number of parameters", unit="count", reference="Jiang et al. 2020 eq. 20"),
        Metric("frobenius_norm_sum", "neither", _norm("frobenius_sum"), "sum over layers of ||W||_F", unit="param", reference="Jiang et al. 2020"),
        Metric("frobenius_norm_prod", "neither", _norm("frobenius_prod"), "product over layers of ||W||_F", unit="param^depth", reference="Jiang et al. 2020"),
        Metric("spectral_norm_sum", "neither", _norm("spectral_sum"), "sum over layers of ||W||_2", unit="param", reference="Jiang et al. 2020"),
        Metric("spectral_norm_prod", "neither", _norm("spectral_prod"), "product over layers of ||W||_2", unit="param^depth", reference="Jiang et al. 2020"),
        Metric("dist_from_init", "neither", Adapter(norms.distance_from_init, read=_identity, artifact=False), "||w - w0||_2", needs=("init_state",), unit="param", reference="Jiang et al. 2020; Nagarajan & Kolter 2019"),
        Metric("param_norm", "neither", _layer_norm("frobenius_sq_sum"), "sum over layers of ||W||_F^2 (batch norm folded)", unit="param^2", reference=f"{_JIANG} eq. 42"),
        Metric("fro_over_spec", "neither", _layer_norm("fro_over_spec"), "sum over layers of ||W||_F^2 / ||W||_2^2 (batch norm folded)", unit="1", reference=f"{_JIANG} eq. 33"),
        Metric("log_prod_of_spec", "neither", _layer_norm("log_spectral_prod", 2.0), "sum over layers of log ||W||_2^2 (batch norm folded)", unit="log", reference=f"{_JIANG} eq. 32"),
        Metric("log_prod_of_fro", "neither", _layer_norm("log_frobenius_prod", 2.0), "sum over layers of log ||W||_F^2 (batch norm folded)", unit="log", reference=f"{_JIANG} eq. 37"),
        Metric("fro_dist_from_init", "neither", Adapter(generalization.layer_distances, read=attrgetter("frobenius_sq_sum"), artifact=False), "sum over layers of ||W - W0||_F^2 (batch norm folded)", needs=("init_state",), unit="param^2", reference=f"{_JIANG} eq. 40"),
        Metric("spec_dist_from_init", "neither", Adapter(generalization.layer_distances, read=attrgetter("spectral_sq_sum"), artifact=False), "sum over layers of ||W - W0||_2^2 (batch norm folded)", needs=("init_state",), unit="param^2", reference=f"{_JIANG} eq. 41"),
        Metric("inverse_margin", "neither", _value(_G.inverse_margin), "1/gamma^2, gamma = abs(10th-percentile output margin)", unit="1/logit^2", reference=f"{_JIANG} eq. 22"),
        Metric("log_prod_of_spec_over_margin", "neither", _value(_G.margin_normalized, {"norm": "spectral"}), "sum over layers of log ||W||_2^2 - 2 log gamma", unit="log", reference=f"{_JIANG} eq. 31; Bartlett et al. 2017"),
        Metric("log_prod_of_fro_over_margin", "neither", _value(_G.margin_normalized, {"norm": "frobenius"}), "sum over layers of log ||W||_F^2 - 2 log gamma", unit="log", reference=f"{_JIANG} eq. 36; Neyshabur et al. 2015"),
        Metric("path_norm", "neither", _value(_G.path_norm), "batch norm folded, all parameters squared, network on an all-ones input, outputs summed", unit="param^2", reference=f"{_JIANG} eq. 44; Neyshabur et al. 2015"),
        Metric("path_norm_over_margin", "neither", _value(_G.path_norm_over_margin), "path_norm / gamma^2", unit="param^2/logit^2", reference=f"{_JIANG} eq. 43"),
        Metric("fisher_rao_norm", "neither", _value(_G.fisher_rao_norm), "mean over samples of <w, grad_w loss_i>^2 (empirical Fisher-Rao norm, squared)", unit="loss^2", reference="Liang et al. 2019"),
        Metric("ggn_top_eig", "sharper", Adapter(ggn.ggn_eigenvalues, {"k": 1}, _eigenvalue), "largest eigenvalue of the generalized Gauss-Newton matrix (the Fisher for cross-entropy)", unit="loss/param^2", reference="Martens 2020; Schraudolph 2002"),
        Metric("ggn_trace", "sharper", Adapter(ggn.ggn_trace), "trace of the generalized Gauss-Newton matrix (Hutch++; the Fisher's for cross-entropy)", unit="loss/param^2", reference="Martens 2020; Meyer et al. 2021 (Hutch++)"),
        Metric("fisher_trace", "sharper", Adapter(ggn.fisher_trace), "trace of the empirical Fisher, mean squared per-sample gradient norm (Hutch++)", unit="loss^2/param^2", reference="Kunstner et al. 2019; Jastrzebski et al. 2021"),
    ]
}
# fmt: on


def register_metric(metric: Metric, *, overwrite: bool = False) -> Metric:
    """Add ``metric`` to :data:`METRICS` so :func:`measure` can compute it by name (its options
    and keys as declared; see :class:`Metric`)."""
    if metric.name in METRICS and not overwrite:
        raise ValueError(f"metric {metric.name!r} is already registered; pass overwrite=True to replace it")
    METRICS[metric.name] = metric
    return metric


def result_keys(metrics: Iterable[str]) -> dict[str, str]:
    """``{result key: metric name}`` for the registered ``metrics``: each metric's declared
    :attr:`Metric.keys` (the ``<name>_seconds`` timings are not included)."""
    return {key: name for name in metrics for key in METRICS[name].keys}


def metric_of_key(key: str) -> Metric | None:
    """The registered metric that declares the result ``key`` (``None``: no metric does)."""
    return next((m for m in METRICS.values() if key in m.keys), None)


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
        metric = METRICS[name]
        start = time.perf_counter()
        value = metric.fn(ctx, **options.get(name, {}))
        if isinstance(value, Reading):
            if value.result is not None:
                ctx.artifacts[name] = value.result
            value = value.value
        elif hasattr(value, "value") and not isinstance(value, Mapping):
            ctx.artifacts[name], value = value, value.value
        values = {k: float(v) for k, v in value.items()} if isinstance(value, Mapping) else {name: float(value)}
        if tuple(values) != metric.keys:
            raise ValueError(
                f"metric {name!r} returned keys {list(values)} but declares keys={list(metric.keys)}; "
                "declare them with Metric(..., keys=...)"
            )
        out.update(values)
        out[f"{name}_seconds"] = time.perf_counter() - start
    if artifacts is not None:
        artifacts.update(ctx.artifacts)
    return out


def check_request(metrics: Iterable[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
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


def _check_options(options: Mapping[str, Mapping[str, Any]] | None, metrics: list[str]) -> dict[str, dict[str, Any]]:
    """``options`` as ``{metric: {keyword: value}}``, checked against the metrics' declarations."""
    options = dict(options or {})
    stray = [m for m in options if m not in metrics]
    if stray:
        raise KeyError(f"options: given for {stray}, which are not in metrics={metrics}")
    for name, opts in options.items():
        if not isinstance(opts, Mapping):
            raise TypeError(f"options[{name!r}]: must be a dict of keyword arguments, got {type(opts).__name__}")
        metric = METRICS[name]
        clash = sorted(set(metric.fixed) & set(opts))
        if clash:
            raise ValueError(
                f"options[{name!r}]: {clash} fixed by this metric ({dict(metric.fixed)}); use the other variant"
            )
        if metric.options is None:
            continue
        bad = sorted(set(opts) - set(metric.options))
        if bad:
            raise TypeError(f"options[{name!r}]: unknown option(s) {bad}; accepted: {sorted(metric.options)}")
    return {name: dict(opts) for name, opts in options.items()}
