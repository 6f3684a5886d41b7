"""The one place dataset, model and metric names are resolved: the registries of
:mod:`.data` and :mod:`.models` and ``landscape.METRICS``, behind the spec's
:class:`~sweeps.spec.catalog.NameCatalog` (installed by the package root)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ..spec.catalog import NameKind, did_you_mean


def _unknown(kind: str, name: str, known: list[str], tail: str = "") -> ValueError:
    return ValueError(f"unknown {kind} {name!r}{did_you_mean(name, known)}; known {kind}s: {', '.join(known)}{tail}")


class RegistryCatalog:
    """Names as registered: :func:`~sweeps.trial.data.register_dataset`,
    :func:`~sweeps.trial.models.register_model` (or a factory path ``package.module:function``),
    :func:`landscape.metrics.register_metric`."""

    def check(self, kind: NameKind, name: str) -> str:
        if kind == "dataset":
            from .data import DATASETS

            if name not in DATASETS:
                raise _unknown("dataset", name, sorted(DATASETS))
        elif kind == "model":
            from .models import MODELS, resolve_factory

            if ":" in name:
                resolve_factory(name)  # raises ValueError with the reason
            elif name not in MODELS:
                raise _unknown("model", name, sorted(MODELS), ", or a factory import path 'package.module:function'")
        else:
            from landscape.metrics import METRICS

            if name not in METRICS:
                raise _unknown("metric", name, sorted(METRICS))
        return name

    def check_options(self, measures: Sequence[str], metric: str, options: Mapping[str, Any]) -> None:
        from landscape.metrics import check_request

        check_request(list(measures), {metric: dict(options)})

    def result_keys(self, measures: Sequence[str]) -> Collection[str]:
        from landscape.metrics import result_keys

        return result_keys(list(measures))


CATALOG = RegistryCatalog()
