"""The sweep config: one YAML file describes a sweep; one trial is that file plus a point.

The schema lives here and only here (pydantic v2 models, unknown keys are errors). Loading goes
through :func:`load_config`, which applies ``--set dotted.key=value`` overrides (values parsed as
YAML) and turns every validation problem into one line of a :class:`ConfigError`::

    search.space.train.lr.low: must be > 0 (got -0.1)
    train.optimzer: unknown key (did you mean 'optimizer'?); allowed keys: batch_size, ...

:meth:`SweepConfig.with_point` sets a point of the search space (dotted keys) and validates the
result; :meth:`SweepConfig.flat` flattens a config to dotted keys for MLflow params and
DataFrame columns.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Defined in modules of their own so that data.py and models.py need not import this one;
# both names stay importable from here.
from .catalog import NameKind, check_known, did_you_mean, installed
from .config_text import parse_override, parse_yaml, read_config_text, set_dotted, yaml_problem
from .errors import ConfigError
from .imports import import_object  # noqa: F401  (re-exported)
from .names import NAME_MAX_LENGTH, NAME_RULE, check_name  # noqa: F401  (re-exported)

# Final trial metrics every trial reports (besides the measures); valid objective metrics.
TRIAL_METRICS = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "gen_gap",
    "epochs",
    "steps",
    "train_seconds",
    "n_train",
    "n_test",
    "num_params",
)
_SKIP_SPACE_CHECK = "skip_space_check"


def _sweep_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as err:
        raise ValueError(str(err).split(": ", 1)[1]) from None


# --- reusable field checks -------------------------------------------------------------------
def _known(kind: NameKind) -> AfterValidator:
    """A dataset, model or metric name, checked through the installed catalog (:mod:`.catalog`)."""
    return AfterValidator(lambda name: check_known(kind, name))


def _batch_size(value: Any) -> int | str:
    if value == "full":
        return "full"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a positive integer or 'full' (got {value!r})")
    return value


MetricName = Annotated[str, _known("metric")]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)


# --- sections --------------------------------------------------------------------------------
class DatasetConfig(_Section):
    """Which data, how much of it, and how noisy (see :mod:`sweeps.trial.data`)."""

    name: Annotated[str, _known("dataset")] = "mnist1d"
    train_size: PositiveInt | None = None  # None: all training samples (teacher: 4000)
    test_size: PositiveInt | None = None  # None: the whole test set
    label_noise: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0  # subsampling and label noise
    root: str | None = None  # files / download folder; default $SWEEPS_CACHE/<name>
    download: bool = True  # torchvision datasets: download when the files are missing
    options: dict[str, Any] = Field(default_factory=dict)  # dataset-specific (teacher: dims ...)


Activation = Literal["relu", "tanh", "gelu", "elu", "silu", "sigmoid", "leaky_relu", "softplus", "identity"]


class ModelConfig(_Section):
    """The network (see :mod:`sweeps.trial.models`)."""

    name: Annotated[str, _known("model")] = "mlp"
    depth: PositiveInt | None = None  # None: the model's default
    width: PositiveInt | None = None  # None: the model's default
    width_multiplier: float = Field(default=1.0, gt=0)
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to a custom factory


class StopConfig(_Section):
    """Convergence target on the full training set; at most one of the two."""

    train_loss: float | None = Field(default=None, gt=0)
    train_acc: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_target(self) -> StopConfig:
        if self.train_loss is not None and self.train_acc is not None:
            raise ValueError("give either train_loss or train_acc, not both")
        return self


class TrackConfig(_Section):
    """Landscape metrics computed during training on a fixed subset of the training set."""

    every_steps: PositiveInt | None = None  # None: no tracking
    metrics: list[MetricName] = Field(default_factory=lambda: ["hessian_top_eig"])
    subset: PositiveInt = 512  # samples (fixed, drawn once with the trial seed)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per tracked metric keywords

    @model_validator(mode="after")
    def _options_for_tracked(self) -> TrackConfig:
        stray = [k for k in self.options if k not in self.metrics]
        if stray:
            raise ValueError(f"options.{stray[0]}: {stray[0]!r} is not in metrics (got {self.metrics})")
        return self


class CheckpointConfig(_Section):
    """When a training trial saves its state to continue exactly after a lost worker or driver
    (see :mod:`sweeps.trial.checkpoint`); both 0: no checkpoints."""

    every_epochs: NonNegativeInt = 0  # epochs between checkpoints (0: by time only)
    every_seconds: float = Field(
        default=60.0, ge=0
    )  # seconds of training between checkpoints, at most (0: by epochs only)

    @property
    def enabled(self) -> bool:
        """True unless both intervals are 0."""
        return self.every_epochs > 0 or self.every_seconds > 0


class TrainConfig(_Section):
    """Optimizer, schedule, loss and stopping rules (see :mod:`sweeps.trial.train`)."""

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)  # sgd only
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: Annotated[int | str, BeforeValidator(_batch_size)] = 128
    schedule: Literal["constant", "cosine", "step", "warmup_cosine"] = "constant"
    warmup_epochs: float = Field(default=5.0, ge=0)  # warmup_cosine
    step_milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # step: fractions of max_epochs
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    max_epochs: PositiveInt = 300
    stop: StopConfig = Field(default_factory=lambda: StopConfig(train_loss=0.01))
    divergence_factor: float = Field(default=10.0, gt=1)  # diverged if loss > factor * initial loss
    eval_every_epochs: PositiveInt = 1  # test-set evaluation / epoch records
    eval_batch_size: PositiveInt = 4096  # chunk size of full-data evaluations
    track: TrackConfig = Field(default_factory=TrackConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)  # saved state for exact restore

    @field_validator("step_milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or sorted(v) != v:
            raise ValueError(f"must be increasing fractions of max_epochs in (0, 1) (got {v})")
        return v


class Dim(_Section):
    """One search dimension: ``values: [...]`` or a range ``low``/``high`` (``log``, ``step``)."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Dim:
        if self.values is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either values or low/high (with log/step), not both")
            if not self.values:
                raise ValueError("values: must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give values: [...] or both low and high")
        if not self.low < self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"low: must be > 0 for log: true (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("step and log: true cannot be combined")
        return self

    def describe(self) -> str:
        """One-line form for params/columns: ``"values=[64, 256]"`` or ``"low=0.01,high=1,log"``."""
        if self.values is not None:
            return f"values={self.values}"
        text = f"low={self.low:g},high={self.high:g}"
        return text + (",log" if self.log else "") + (f",step={self.step:g}" if self.step is not None else "")

    def grid(self) -> list[Any]:
        """The values of this dimension on a grid (``values``, or ``low..high`` by ``step``)."""
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise ValueError("a range needs step: to be enumerated on a grid")
        assert self.low is not None and self.high is not None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        points = [self.low + i * self.step for i in range(n)]
        whole = all(float(x).is_integer() for x in (self.low, self.step))
        return [int(round(p)) if whole else p for p in points]


class SearchConfig(_Section):
    """How the sweep service picks points (Optuna)."""

    sampler: Literal["grid", "random", "tpe", "cmaes", "nsga2"] = "grid"
    n_trials: PositiveInt | None = None  # grid: default the grid size
    seed: int = 0
    space: dict[str, Dim] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sampler_needs(self) -> SearchConfig:
        problems = []
        if self.sampler == "grid":
            for key, dim in self.space.items():
                if dim.values is None and dim.step is None:
                    problems.append(f"space.{key}: the grid sampler needs values: [...] or a step (got low/high only)")
        elif self.n_trials is None and self.space:
            problems.append(f"n_trials: required for sampler {self.sampler!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


Direction = Literal["maximize", "minimize"]


class ObjectiveConfig(_Section):
    """What the search optimizes. ``{metric, direction}`` or lists of both (multi-objective)."""

    metrics: list[str] = Field(default_factory=lambda: ["test_acc"], min_length=1)
    directions: list[Direction] = Field(default_factory=lambda: list[Direction](["maximize"]), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _singular(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for one, many in (("metric", "metrics"), ("direction", "directions")):
            if one in data:
                if many in data:
                    raise ValueError(f"give {one} or {many}, not both")
                value = data.pop(one)
                data[many] = value if isinstance(value, list) else [value]
            elif isinstance(data.get(many), str):
                data[many] = [data[many]]
        return data

    @model_validator(mode="after")
    def _same_length(self) -> ObjectiveConfig:
        if len(self.directions) == 1 and len(self.metrics) > 1:
            self.directions = self.directions * len(self.metrics)
        if len(self.metrics) != len(self.directions):
            raise ValueError(
                f"metric and direction lists differ in length (got {len(self.metrics)} metrics, {len(self.directions)} directions)"
            )
        return self

    @property
    def metric(self) -> str:
        """The first (or only) objective metric."""
        return self.metrics[0]

    @property
    def direction(self) -> Direction:
        return self.directions[0]


class ResourcesConfig(_Section):
    """Per-trial resources for Ray."""

    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0)
    max_concurrent: PositiveInt | None = None  # None: as many as the cluster fits
    population_size: int | Literal["auto"] = "auto"  # models trained as one stack per task (1: one per task)
    compile: bool | Literal["auto"] = "auto"  # one compiled step per population (auto: when it trains long enough)

    @field_validator("population_size", mode="before")
    @classmethod
    def _population_size(cls, v: Any) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a positive integer or 'auto' (got {v!r})")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> bool | str:
        if v == "auto" or isinstance(v, bool):
            return v
        raise ValueError(f"must be auto, true or false (got {v!r})")


class SweepConfig(_Section):
    """A whole sweep (or, with a point set, one trial). Every field: the config reference of the documentation site (generated from this schema)."""

    name: Annotated[str, Field(min_length=1), AfterValidator(_sweep_name)]  # letters, digits, - _ . (not first); <= 100
    description: str = ""
    seed: int = 0  # model initialization and data order
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    measure: list[MetricName] = Field(default_factory=lambda: ["hessian_top_eig", "hessian_trace"])
    measure_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    measure_subset: PositiveInt | None = None  # samples of the training set; None: all
    search: SearchConfig = Field(default_factory=SearchConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> SweepConfig:
        problems = []
        stray = [k for k in self.measure_options if k not in self.measure]
        problems += [f"measure_options.{k}: {k!r} is not in measure (got {self.measure})" for k in stray]
        if not stray:
            problems += _measure_option_problems(self.measure_options, self.measure)
        for i, metric in enumerate(self.objective.metrics):
            if not _is_result_key(metric, self.measure):
                problems.append(
                    f"objective.metrics.{i}: {metric!r} is not a trial result; use one of "
                    f"{', '.join(TRIAL_METRICS)} or a measure in measure: (got {metric!r})"
                )
        if not problems and not (info.context or {}).get(_SKIP_SPACE_CHECK):
            problems = self._space_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _space_problems(self) -> list[str]:
        """Every key of search.space must be a config field and accept each of its values."""
        problems = []
        for key, dim in self.search.space.items():
            if not _is_field_path(key):
                problems.append(
                    f"search.space.{key}: not a config field (keys are dotted paths such as train.lr, model.width, seed)"
                )
                continue
            candidates = dim.values if dim.values is not None else [dim.low, dim.high]
            for value in candidates:
                try:
                    self.with_point({key: value})
                except ConfigError as err:
                    problems += [f"search.space.{key}: value {value!r} is invalid: {p}" for p in err.problems]
                    break
        return problems

    # --- API used by the sweep service --------------------------------------------------
    def with_point(self, point: Mapping[str, Any]) -> SweepConfig:
        """A validated copy with the dotted keys of ``point`` set (``{"train.lr": 0.1}``)."""
        data = self.model_dump()
        for key, value in point.items():
            if not _is_field_path(key):
                raise ConfigError(f"{key}: not a config field (got {value!r})")
            set_dotted(data, key, value)
        return _validate(data, context={_SKIP_SPACE_CHECK: True})

    def flat(self) -> dict[str, bool | int | float | str]:
        """Dotted keys -> scalars (lists comma-joined, ``None`` left out, each search dimension
        as one string ``search.space.<key>``): MLflow params and DataFrame columns."""
        out: dict[str, bool | int | float | str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, (list, tuple)):
                out[prefix] = ",".join(str(v) for v in value)
            elif value is not None:
                out[prefix] = value

        data = self.model_dump(mode="json")
        data["search"]["space"] = {k: dim.describe() for k, dim in self.search.space.items()}
        walk("", data)
        return out


def _measure_option_problems(options: dict[str, dict[str, Any]], measures: list[str]) -> list[str]:
    """Keywords the measure functions do not accept, checked as :func:`landscape.measure` will
    (through the installed catalog; none installed: not checked)."""
    catalog = installed()
    if catalog is None:
        return []
    for name, opts in options.items():
        try:
            catalog.check_options(measures, name, opts)
        except (KeyError, TypeError, ValueError) as err:
            text = str(err.args[0] if err.args else err)
            return [f"measure_options.{name}: {text.split(': ', 1)[-1]} (got {opts})"]
    return []


def _is_result_key(metric: str, measures: Sequence[str]) -> bool:
    """A trial metric, or a result key declared by one of the ``measures`` (``Metric.keys``;
    through the installed catalog, any name when none is installed)."""
    catalog = installed()
    return metric in TRIAL_METRICS or catalog is None or metric in catalog.result_keys(measures)


_LEAF, _FREE = "leaf", "free"


def _walk_schema(parts: Sequence[Any]) -> Any:
    """Follow ``parts`` through the schema: a model class, ``_FREE`` (inside a free-form dict
    such as ``kwargs``), ``_LEAF`` (a scalar field) or ``None`` (no such field)."""
    node: Any = SweepConfig
    pending_key = False  # the next part is a key of a dict-of-models field (search.space)
    for part in parts:
        if pending_key:
            pending_key = False
            continue
        if node is _FREE:
            return _FREE
        if node is _LEAF or node is None:
            return None
        field = node.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            node = ann
        elif get_origin(ann) is dict:
            value_type = get_args(ann)[1]
            if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                node, pending_key = value_type, True
            else:
                node = _FREE
        else:
            node = _LEAF
    return node


def _is_field_path(key: str) -> bool:
    """True if the dotted ``key`` names a settable schema field (or an entry of ``kwargs``/``options``)."""
    return _walk_schema(key.split(".")) is not None


# --- turning pydantic errors into one line each -------------------------------------------
def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Field names of the section that holds ``loc[-1]`` (for 'allowed keys' hints)."""
    node = _walk_schema(loc[:-1])
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _describe(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _fields_at(error["loc"])
        hint = did_you_mean(str(error["loc"][-1]), known)
        return f"unknown key{hint}" + (f"; allowed keys: {', '.join(known)}" if known else "")
    if kind == "missing":
        return "required"
    simple = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "literal_error": "must be one of {expected}",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "dict_type": "must be a mapping (key: value)",
        "list_type": "must be a list",
        "model_type": "must be a mapping (key: value)",
        "model_attributes_type": "must be a mapping (key: value)",
        "too_short": "must have at least {min_length} item(s)",
        "string_too_short": "must not be empty",
    }
    if kind in simple:
        return simple[kind].format(**ctx)
    msg = error["msg"]
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        text = _describe(e)
        for part in text.split("\n"):  # a validator may report several problems
            has_path = ":" in part.split(" ")[0]
            line = part if not where else f"{where}.{part}" if has_path else f"{where}: {part}"
            show_input = e["type"] not in ("missing", "extra_forbidden", "value_error", "assertion_error")
            if show_input and "(got" not in line:
                line += f" (got {e.get('input')!r})"
            lines.append(line)
    return lines


def _validate(data: Any, context: dict[str, Any] | None = None) -> SweepConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: must be a mapping of sections (got {type(data).__name__})")
    try:
        return SweepConfig.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(_lines(err)) from None


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> SweepConfig:
    """Read (a YAML path or a dict), apply ``overrides`` ("dotted.key=value"), validate.

    Raises:
        ConfigError: every problem, one line each, naming the dotted field.
    """
    if isinstance(source, Mapping):
        data: Any = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        text = read_config_text(path)
        try:
            data = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML: {yaml_problem(err)}") from None
        except RecursionError:
            raise ConfigError(f"config: {path} is nested too deeply to be a sweep config") from None
        if data is None:
            raise ConfigError(f"config: {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"config: must be a mapping of sections (got {type(data).__name__})")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    try:
        return _validate(data)
    except RecursionError:
        raise ConfigError("config: nested too deeply to be a sweep config") from None
