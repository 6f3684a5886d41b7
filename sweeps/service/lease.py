"""One driver per sweep: a lease held in the sweep's own database, renewed by a heartbeat.

A driver (``sweeps run`` / ``sweeps resume`` / :func:`sweeps.run_sweep`) takes the lease of its
sweep before it touches the study or MLflow, and gives it back when it stops. A second driver of
the same sweep is refused with :class:`LeaseHeldError`, which says who holds the lease (host,
pid, since when). A holder that stops heart-beating (killed, its machine lost, paused) loses
the lease :data:`LEASE_SECONDS` after its last heartbeat; the next driver takes it over and
recovers what the dead one left (see :mod:`sweeps.runner`). A driver that finds its lease taken
(it was paused past the expiry) stops without writing anything more: :class:`LeaseLostError`.

Where the lease lives: a table ``sweeps_driver_lease`` in the database of the sweep's Optuna
storage (SQLite file or PostgreSQL/MySQL server), one row per sweep name. Taking and renewing
are single SQL statements (an ``INSERT`` that fails on the primary key, an ``UPDATE ... WHERE``
on the holder's token or on an expired heartbeat), so two drivers racing for one sweep cannot
both win on any of these databases. A journal-file storage keeps its leases in an SQLite file
beside the journal (``<journal>.lease.db``).

Heartbeat times are the drivers' own wall clocks (seconds since the epoch): drivers of one
sweep on different hosts need clocks synchronized to well within :data:`LEASE_SECONDS`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .connections import is_journal_storage, journal_path, redact

#: Seconds after the last heartbeat at which a lease expires (``SWEEPS_LEASE_SECONDS`` overrides).
LEASE_SECONDS = 30.0
#: Heartbeats per lease period.
_BEATS_PER_LEASE = 6

_TABLE = sa.Table(
    "sweeps_driver_lease",
    sa.MetaData(),
    sa.Column("sweep", sa.String(512), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("since", sa.Float, nullable=False),  # epoch seconds the holder took the lease
    sa.Column("heartbeat", sa.Float, nullable=False),  # epoch seconds of its last heartbeat
)
_ENGINES: dict[tuple[int, str], sa.Engine] = {}


def lease_seconds() -> float:
    """The lease period in seconds: ``$SWEEPS_LEASE_SECONDS`` or :data:`LEASE_SECONDS`."""
    value = os.environ.get("SWEEPS_LEASE_SECONDS")
    if value is None:
        return LEASE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"SWEEPS_LEASE_SECONDS: must be a positive number of seconds (got {value!r})")
    return seconds


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a sweep's lease.

    Attributes:
        host, pid: the driver process.
        since: epoch seconds at which it took the lease.
        heartbeat: epoch seconds of its last heartbeat.
    """

    host: str
    pid: int
    since: float
    heartbeat: float

    def alive(self, seconds: float | None = None, now: float | None = None) -> bool:
        """True while the last heartbeat is younger than the lease period."""
        return (now if now is not None else time.time()) - self.heartbeat < (seconds or lease_seconds())

    def describe(self) -> str:
        """``"host pid 123 since 2026-12-01 10:00:00 (heartbeat 2 s ago)"``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (
            f"{self.host} pid {self.pid} since {since} (heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "since": self.since,
            "heartbeat": self.heartbeat,
            "alive": self.alive(),
            "description": self.describe(),
        }


class LeaseHeldError(RuntimeError):
    """Another live driver holds the sweep's lease (CLI exit code 2)."""

    def __init__(self, sweep: str, holder: Holder, seconds: float) -> None:
        self.sweep, self.holder = sweep, holder
        super().__init__(
            f"sweep {sweep!r} is being run by another driver: {holder.describe()}. One driver per sweep: "
            f"wait for it (`sweeps status {sweep}` shows its progress), or stop it (Ctrl-C in its terminal, "
            f"`kill {holder.pid}` on {holder.host}, `ray job stop` for a Ray job) and run this again; if that "
            f"process is gone, its lease expires {seconds:g} s after its last heartbeat"
        )


class LeaseLostError(RuntimeError):
    """This driver's lease was taken over by another driver (it was paused or cut off past expiry)."""


def lease_url(storage: str) -> str:
    """The database URL that holds the leases of sweeps stored in ``storage``."""
    if is_journal_storage(storage):
        path = journal_path(storage)
        return f"sqlite:///{path.with_name(path.name + '.lease.db')}"
    return storage


def _engine(storage: str) -> sa.Engine:
    """One small engine per (process, database); the table is created on first use."""
    url = lease_url(storage)
    key = (os.getpid(), url)
    if key not in _ENGINES:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"timeout": 60})
        else:
            engine = sa.create_engine(url, pool_size=1, max_overflow=2, pool_pre_ping=True)
        try:
            _TABLE.metadata.create_all(engine, checkfirst=True)
        except sa.exc.DBAPIError as err:  # created by another driver at the same moment
            if "already exists" not in str(err) and "duplicate" not in str(err).lower():
                raise
        _ENGINES[key] = engine
    return _ENGINES[key]


def _row_holder(row: Any) -> Holder:
    return Holder(row.host, int(row.pid), float(row.since), float(row.heartbeat))


def current_holder(storage: str, sweep: str) -> Holder | None:
    """Who holds (or last held, if it expired) the lease of ``sweep``; ``None`` if nobody does."""
    with _engine(storage).connect() as con:
        row = con.execute(sa.select(_TABLE).where(_TABLE.c.sweep == sweep)).first()
    return None if row is None else _row_holder(row)


class DriverLease:
    """The lease of one sweep, held by this process while a driver runs.

    Use as a context manager: ``with DriverLease(storage, name) as lease: ...`` takes the lease
    (or raises :class:`LeaseHeldError`), heart-beats from a daemon thread, and gives the lease
    back on exit (unless it was lost). Call :meth:`ensure` before each write to the sweep's
    stores: it raises :class:`LeaseLostError` once another driver has taken over.

    Args:
        storage: the sweep's Optuna storage URL or journal path.
        sweep: the sweep name.
        seconds: lease period (default :func:`lease_seconds`).
    """

    def __init__(self, storage: str, sweep: str, seconds: float | None = None) -> None:
        self.storage, self.sweep = storage, sweep
        self.seconds = seconds or lease_seconds()
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.taken_over: Holder | None = None  # the expired holder this driver replaced, if any
        self._renewed = 0.0  # time.monotonic() of the last successful heartbeat
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"DriverLease({redact(self.storage)!r}, {self.sweep!r})"

    # taking and giving back ---------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease; raise :class:`LeaseHeldError` if a live driver holds it.

        Sets :attr:`taken_over` when the lease of a driver that stopped heart-beating was taken.
        """
        engine, now = _engine(self.storage), time.time()
        values = dict(token=self.token, host=self.host, pid=self.pid, since=now, heartbeat=now)
        try:
            with engine.begin() as con:
                con.execute(_TABLE.insert().values(sweep=self.sweep, **values))
        except sa.exc.IntegrityError:  # a row exists: take it only if its holder stopped heart-beating
            previous = current_holder(self.storage, self.sweep)
            with engine.begin() as con:
                taken = con.execute(
                    _TABLE.update()
                    .where(_TABLE.c.sweep == self.sweep, _TABLE.c.heartbeat < now - self.seconds)
                    .values(**values)
                ).rowcount
            if taken != 1:
                holder = current_holder(self.storage, self.sweep) or previous
                assert holder is not None
                raise LeaseHeldError(self.sweep, holder, self.seconds) from None
            self.taken_over = previous
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"sweeps-lease-{self.sweep}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop heart-beating and give the lease back (a lost lease is left to its new holder)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self._lost.is_set():
            try:
                with _engine(self.storage).begin() as con:
                    con.execute(_TABLE.delete().where(_TABLE.c.sweep == self.sweep, _TABLE.c.token == self.token))
            except sa.exc.SQLAlchemyError:  # the database is gone: the lease expires by itself
                pass

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # heartbeat ----------------------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """True once another driver took the lease over."""
        return self._lost.is_set()

    def renew(self) -> None:
        """One heartbeat now; raises :class:`LeaseLostError` if the lease is no longer this driver's."""
        if self._lost.is_set():
            raise LeaseLostError(self.lost_message())
        with _engine(self.storage).begin() as con:
            kept = con.execute(
                _TABLE.update()
                .where(_TABLE.c.sweep == self.sweep, _TABLE.c.token == self.token)
                .values(heartbeat=time.time())
            ).rowcount
        if kept != 1:
            self._lost.set()
            raise LeaseLostError(self.lost_message())
        self._renewed = time.monotonic()

    def ensure(self) -> None:
        """Raise :class:`LeaseLostError` unless this driver still holds the lease.

        Cheap while the heartbeat thread keeps the lease fresh; after a pause (the process was
        stopped, the machine slept) it renews synchronously first, so a driver that slept past
        the expiry finds out before it writes.
        """
        if self._lost.is_set() or time.monotonic() - self._renewed > self.seconds / 2:
            self.renew()

    def _beat(self) -> None:
        interval = self.seconds / _BEATS_PER_LEASE
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLostError:
                return
            except sa.exc.SQLAlchemyError:  # a transient database error: try again at the next beat
                continue

    def lost_message(self) -> str:
        """Why this driver stopped, naming the driver that holds the lease now."""
        holder = current_holder(self.storage, self.sweep)
        who = holder.describe() if holder is not None else "nobody (released)"
        return (
            f"sweep {self.sweep!r}: this driver lost its lease (no heartbeat for more than {self.seconds:g} s, "
            f"e.g. the process was paused) and another driver took over: {who}. Stopped without writing."
        )


__all__ = [
    "LEASE_SECONDS",
    "DriverLease",
    "Holder",
    "LeaseHeldError",
    "LeaseLostError",
    "current_holder",
    "lease_seconds",
    "lease_url",
]
