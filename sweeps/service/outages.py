"""Riding out store outages: retries with backoff while the Optuna storage or the MLflow tracking
store cannot be reached, one log line when an outage starts and one when it ends, and a clean
stop past a time limit.

A database restart or failover, an ``mlflow server`` restarted, a network blip: each makes a
store unreachable for seconds to minutes while the sweep's trials go on training on the cluster.
A :class:`StoreGuard` per store wraps every call the driver makes to it (:meth:`StoreGuard.call`):
a call that fails because the store is unreachable (:func:`is_unreachable`) is tried again with
growing waits (0.5 s doubling up to 15 s) until it succeeds or the store has been unreachable for
the guard's limit; then :class:`StoreUnavailableError` is raised and every later call through the
guard fails at its first unreachable error (the driver stops, see :mod:`sweeps.runner`).

Limits: :data:`STORE_RETRY_SECONDS` for a driver (``SWEEPS_STORE_RETRY_SECONDS``),
:data:`READ_RETRY_SECONDS` for reads (``sweeps results``, ``status``, ``report``, ``list``;
``SWEEPS_READ_RETRY_SECONDS``); ``0`` turns retrying off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

#: Seconds a driver rides out an unreachable store before it stops (``SWEEPS_STORE_RETRY_SECONDS``).
STORE_RETRY_SECONDS = 600.0
#: Seconds a read (results, status, report, list) waits for an unreachable store (``SWEEPS_READ_RETRY_SECONDS``).
READ_RETRY_SECONDS = 60.0
#: Waits between tries: the first, and the longest it doubles up to (seconds).
FIRST_WAIT_SECONDS, LONGEST_WAIT_SECONDS = 0.5, 15.0

_LOG = logging.getLogger("sweeps.stores")
T = TypeVar("T")


def retry_seconds(variable: str, default: float) -> float:
    """The limit in seconds read from the environment ``variable``, else ``default``."""
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{variable}: must be a number of seconds >= 0 (got {value!r}; 0 turns retrying off)")
    return seconds


def store_retry_seconds() -> float:
    """A driver's limit: ``$SWEEPS_STORE_RETRY_SECONDS`` or :data:`STORE_RETRY_SECONDS`."""
    return retry_seconds("SWEEPS_STORE_RETRY_SECONDS", STORE_RETRY_SECONDS)


def read_retry_seconds() -> float:
    """A read's limit: ``$SWEEPS_READ_RETRY_SECONDS`` or :data:`READ_RETRY_SECONDS`."""
    return retry_seconds("SWEEPS_READ_RETRY_SECONDS", READ_RETRY_SECONDS)


class StoreUnavailableError(RuntimeError):
    """A store stayed unreachable past its guard's limit.

    Attributes:
        store: which store (its kind and redacted address).
        seconds: how long it had been unreachable.
        sweep: the sweep whose driver stopped (set by the driver), or ``None``.
    """

    def __init__(self, store: str, seconds: float, limit: float, variable: str, error: BaseException) -> None:
        self.store, self.seconds = store, seconds
        self.sweep: str | None = None
        super().__init__(
            f"{store}: unreachable for {seconds:.0f} s, past the limit of {limit:g} s ({variable}); "
            f"last error: {_one_line(error)}"
        )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def unreachable_cause(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain (itself, what it was raised from or while handling) that
    says a store could not be reached, or ``None`` when none does (see :func:`is_unreachable`)."""
    import sqlalchemy.exc

    if isinstance(error, StoreUnavailableError):  # a retry that gave up already: not to be retried again
        return None
    try:
        import requests.exceptions

        # refused or dropped, timed out, or a server answering "unavailable" past MLflow's own retries
        http: tuple[type[BaseException], ...] = (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.RetryError,
        )
    except ImportError:  # pragma: no cover - requests comes with MLflow
        http = ()
    lost = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, ConnectionError, TimeoutError, *http)
    for err in _chain(error):
        if isinstance(err, lost) or (isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated):
            return err
        if getattr(err, "error_code", None) == "TEMPORARILY_UNAVAILABLE":  # MlflowException
            return err
    return None


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says a store could not be reached, as
    opposed to a request the store refused: a database connection refused, closed or dropped
    (SQLAlchemy's ``OperationalError``/``InterfaceError``, a connection invalidated; Optuna wraps
    them in ``StorageInternalError``), an HTTP connection refused or timed out, a server that kept
    answering 5xx through MLflow's own retries, or MLflow's ``TEMPORARILY_UNAVAILABLE`` (its
    store's database is down)."""
    return unreachable_cause(error) is not None


@contextlib.contextmanager
def short_mlflow_http_retries() -> Iterator[None]:
    """While a driver runs: MLflow's own HTTP retries cut to about 3 s per request (2 retries,
    backoff factor 1; its defaults retry for about two minutes), unless the user set them, so
    that the driver's guard does the long waiting, logs it, and can stop when told to. Restored
    on exit."""
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    set_here = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in set_here})
    try:
        yield
    finally:
        for name in set_here:
            os.environ.pop(name, None)


class StoreGuard:
    """Calls to one store, retried while it is unreachable (see the module docstring).

    Args:
        store: what to call the store in messages (kind and redacted address).
        limit: seconds of unreachability after which :class:`StoreUnavailableError` is raised.
        log: where the outage's first and last lines go (a driver's progress view).
        variable: the environment variable that sets ``limit`` (named in the error).
        stop: an object whose ``requested`` attribute, once true (Ctrl-C), ends the waiting.
        clock, sleep: for tests.

    Thread-safe: the recorder's writer threads share their store's guard; the outage is one
    for all of them (it starts at the first failure and ends at the first success).
    """

    def __init__(
        self,
        store: str,
        limit: float,
        log: Callable[[str], None] = _LOG.warning,
        *,
        variable: str = "SWEEPS_STORE_RETRY_SECONDS",
        stop: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store, self.limit, self.log, self.variable, self.stop = store, limit, log, variable, stop
        self.clock, self.sleep = clock, sleep
        self.down_since: float | None = None  # clock() at the first failure of the outage under way
        self.gave_up = False
        self.outages = 0  # outages ridden out
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, tried again while the store is unreachable."""
        tries = 0
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                if not is_unreachable(err):
                    raise
                self._wait(err, tries)
                tries += 1
                continue
            if self.down_since is not None:
                self._back()
            return result

    def _wait(self, error: Exception, tries: int) -> None:
        with self._lock:
            now = self.clock()
            if self.down_since is None:
                if self.gave_up or self.limit <= 0:
                    raise StoreUnavailableError(
                        self.store, 0.0, self.limit, self.variable, self._cause(error)
                    ) from error
                self.down_since = now
                self.log(
                    f"{self.store}: unreachable ({_one_line(self._cause(error))}); trials go on, results are held and "
                    f"retried for up to {self.limit:g} s"
                )
            down = now - self.down_since
            if down >= self.limit or self.gave_up or (self.stop is not None and self.stop.requested):
                self.gave_up = True
                raise StoreUnavailableError(self.store, down, self.limit, self.variable, self._cause(error)) from error
            left = self.limit - down
        wait = min(LONGEST_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2 ** min(tries, 16)) * random.uniform(0.8, 1.2)
        self.sleep(min(wait, left))

    @staticmethod
    def _cause(error: BaseException) -> BaseException:
        return unreachable_cause(error) or error

    def _back(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            down, self.down_since = self.clock() - self.down_since, None
            self.outages += 1
        self.log(f"{self.store}: reachable again after {down:.1f} s")


def retrying_read(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` (a read of a sweep's stores) tried again while a store is unreachable, up to
    :func:`read_retry_seconds`; the outage is logged on the ``sweeps.stores`` logger."""

    @functools.wraps(fn)
    def read(*args: Any, **kwargs: Any) -> T:
        store = f"the sweep's stores (read by {fn.__name__})"
        guard = StoreGuard(store, read_retry_seconds(), variable="SWEEPS_READ_RETRY_SECONDS")
        return guard.call(fn, *args, **kwargs)

    return read


__all__ = [
    "READ_RETRY_SECONDS",
    "STORE_RETRY_SECONDS",
    "StoreGuard",
    "StoreUnavailableError",
    "is_unreachable",
    "read_retry_seconds",
    "retrying_read",
    "short_mlflow_http_retries",
    "unreachable_cause",
    "store_retry_seconds",
]
