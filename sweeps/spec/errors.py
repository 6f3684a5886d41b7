"""The errors of bad input: :class:`ConfigError` (a config that does not validate, one line per problem) and :class:`UsageError`.

A module of its own (it imports nothing from ``sweeps``) so that the config schema and the
modules that check a config against what they build (:mod:`sweeps.trial.data`, :mod:`sweeps.trial.models`)
can all raise it without importing each other. ``sweeps.spec.config.ConfigError`` is the same class.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A config that does not validate. ``str()`` has one line per problem:
    ``"dotted.field: problem (got X)"``; :attr:`problems` holds the lines as a list."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(ValueError):
    """Bad input that is not a config field: a sweep NAME argument, a path that would lead a write
    elsewhere. The CLI prints it as one line and exits 2."""


__all__ = ["ConfigError", "UsageError"]
