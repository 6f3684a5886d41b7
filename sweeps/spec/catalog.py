"""Which dataset, model and metric names exist, as the schema asks: through a catalog it is given.

The schema (:mod:`.config`) holds names as strings. The names themselves are defined by the layer
that implements them (the trial layer's registries, ``landscape.METRICS``), which provides a
:class:`NameCatalog`; the package root installs it with :func:`use_catalog`, as a function called
on first use, so importing the spec never imports torch. Without a catalog, names are taken as
written (the schema then checks structure only).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, Protocol

NameKind = Literal["dataset", "model", "metric"]


class NameCatalog(Protocol):
    def check(self, kind: NameKind, name: str) -> str:
        """``name`` if it names a known ``kind``; else ``ValueError`` saying which names are known."""
        ...

    def check_options(self, measures: Sequence[str], metric: str, options: Mapping[str, Any]) -> None:
        """Raise ``KeyError``/``TypeError``/``ValueError`` if ``metric`` does not accept ``options``."""
        ...

    def result_keys(self, measures: Sequence[str]) -> Collection[str]:
        """The result keys the ``measures`` report (a measure may report several)."""
        ...


_provider: Callable[[], NameCatalog] | None = None


def use_catalog(provider: Callable[[], NameCatalog] | None) -> None:
    """Check names through ``provider()`` from now on (``None``: structure only)."""
    global _provider
    _provider = provider


def installed() -> NameCatalog | None:
    """The installed catalog, or ``None``."""
    return None if _provider is None else _provider()


def check_known(kind: NameKind, name: str) -> str:
    """``name`` checked against the installed catalog (unchanged when none is installed)."""
    catalog = installed()
    return name if catalog is None else catalog.check(kind, name)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
