"""Where a sweep keeps its state: results directory, MLflow tracking URI, Optuna storage, Ray address.

Each value is resolved once, in this order: the explicit argument (a CLI flag), then the
environment, then the embedded default under the results directory:

==============  ======================  ===========================================  ==========================
value           flag                    environment                                  default
==============  ======================  ===========================================  ==========================
results dir     ``--results-dir``       ``SWEEPS_RESULTS_DIR``                       ``./sweeps-results``
tracking URI    ``--tracking-uri``      ``SWEEPS_TRACKING_URI``, ``MLFLOW_TRACKING_URI`` ``sqlite:///<dir>/mlflow.db``
Optuna storage  ``--storage``           ``SWEEPS_STORAGE``                           ``sqlite:///<dir>/optuna.db``
Ray address     ``--address``           ``RAY_ADDRESS``                              a local Ray started here
checkpoints     -                       ``SWEEPS_CHECKPOINT_DIR``                    ``<dir>/checkpoints``
==============  ======================  ===========================================  ==========================

MLflow artifacts of the embedded default go to ``<dir>/mlartifacts``. Trial checkpoints
(:mod:`sweeps.checkpoint`) are written by the workers: on a cluster the checkpoint folder must be
one that every node and the driver mount at the same path. A storage value that
ends in ``.log`` or ``.journal`` (or starts with ``journal://``) is an Optuna
``JournalStorage`` file instead of an RDB URL.

Anything printed or logged goes through :func:`redact` first: passwords in URLs and
token-like query parameters become ``***``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_RESULTS_DIR = "sweeps-results"

log = logging.getLogger(__name__)

_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pwd|token|secret|key|access_key|api_key)=)[^&;#]*")
_USERINFO_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def redact(text: str) -> str:
    """``text`` with URL passwords (``user:PASSWORD@host``) and secret query values replaced by ``***``."""
    text = _USERINFO_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _SECRET_QUERY.sub(r"\1***", text)


@dataclass(frozen=True)
class Connections:
    """Resolved locations of one sweep service (see the module docstring for the rules).

    Attributes:
        results_dir: absolute directory holding the embedded stores and per-trial scratch files.
        tracking_uri: MLflow tracking URI, passed explicitly to the driver's client (workers
            never write to MLflow, see :mod:`sweeps.runner`).
        storage: Optuna storage URL or journal file path.
        address: Ray address (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) or ``None`` to start
            a local Ray sized to this machine.
        artifact_root: artifact location for new MLflow experiments (a ``file://`` URI under the
            results directory for local stores; ``None`` lets an HTTP server decide).
        checkpoint_dir: the folder of trial checkpoints (absolute; :mod:`sweeps.checkpoint`).
    """

    results_dir: Path
    tracking_uri: str
    storage: str
    address: str | None
    artifact_root: str | None
    checkpoint_dir: Path | None = None

    @property
    def is_journal(self) -> bool:
        """True when :attr:`storage` names an Optuna journal file rather than a database URL."""
        return is_journal_storage(self.storage)

    def describe(self) -> dict[str, str]:
        """Redacted, printable view of the locations."""
        return {
            "results_dir": str(self.results_dir),
            "tracking_uri": redact(self.tracking_uri),
            "storage": redact(self.storage),
            "ray": redact(self.address) if self.address else "local (started by this process)",
            "checkpoints": str(self.checkpoint_dir),
        }


def is_journal_storage(storage: str) -> bool:
    return storage.startswith("journal://") or storage.endswith((".log", ".journal"))


def journal_path(storage: str) -> Path:
    return Path(storage.removeprefix("journal://")).expanduser()


def resolve(
    *,
    results_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    env: Mapping[str, str] | None = None,
    create: bool = True,
) -> Connections:
    """Resolve the service locations from arguments, then ``env`` (default ``os.environ``), then defaults.

    Creates the results directory unless ``create=False`` (readers such as
    :func:`sweeps.results` must not leave empty stores behind). Raises
    ``ValueError`` naming the flag when a value is malformed.
    """
    env = os.environ if env is None else env
    directory = Path(results_dir or env.get("SWEEPS_RESULTS_DIR") or DEFAULT_RESULTS_DIR).expanduser().resolve()
    if create:
        directory.mkdir(parents=True, exist_ok=True)

    tracking = tracking_uri or env.get("SWEEPS_TRACKING_URI") or env.get("MLFLOW_TRACKING_URI")
    tracking = tracking or f"sqlite:///{directory / 'mlflow.db'}"
    _check_uri("--tracking-uri", tracking, ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks"))

    study_storage = storage or env.get("SWEEPS_STORAGE") or f"sqlite:///{directory / 'optuna.db'}"
    if not is_journal_storage(study_storage):
        _check_uri("--storage", study_storage, ("sqlite", "postgresql", "mysql", "oracle", "mssql"))

    ray_address = address or env.get("RAY_ADDRESS") or None
    local_store = urlsplit(tracking).scheme in ("sqlite", "file", "postgresql", "mysql")
    artifact_root = (directory / "mlartifacts").as_uri() if local_store else None
    from .checkpoint import DIRECTORY, ENV

    checkpoints = Path(env.get(ENV) or directory / DIRECTORY).expanduser().resolve()
    return Connections(directory, tracking, study_storage, ray_address, artifact_root, checkpoints)


def _check_uri(flag: str, uri: str, schemes: tuple[str, ...]) -> None:
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in schemes:
        raise ValueError(
            f"{flag}: unsupported URI {redact(uri)!r}; use one of the schemes {', '.join(schemes)}"
            " (e.g. sqlite:////abs/path.db or postgresql://user@host/db)"
        )


def check_reachable(conn: Connections, timeout: float = 5.0) -> None:
    """Fail fast with ``ConnectionError`` (message redacted, naming the flag) if a network store is down.

    Local files (sqlite, journal) need only a writable parent directory; network stores need an
    open TCP port.
    """
    for flag, uri in (("--tracking-uri", conn.tracking_uri), ("--storage", conn.storage)):
        if flag == "--storage" and conn.is_journal:
            parent = journal_path(uri).parent
            if not os.access(parent, os.W_OK):
                raise ConnectionError(f"{flag}: directory {parent} is not writable")
            continue
        parts = urlsplit(uri)
        if parts.scheme.startswith("sqlite"):
            path = sqlite_path(uri)
            if path is not None and not os.access(path.parent, os.W_OK):
                raise ConnectionError(f"{flag}: directory of {redact(uri)} is not writable")
            continue
        if not parts.hostname:
            continue
        port = parts.port or {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}.get(
            parts.scheme.split("+")[0], 0
        )
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as err:
            raise ConnectionError(f"{flag}: cannot reach {redact(uri)} ({err}); is the server running?") from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite URL (``sqlite:///relative.db``, ``sqlite:////abs/path.db``),
    ``None`` for any other URL and for an in-memory database."""
    if not uri.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).absolute() if database and database != ":memory:" else None


def use_wal(uri: str) -> bool:
    """Switch the SQLite file of ``uri`` to write-ahead logging; returns whether it is in WAL mode
    (``False`` for other URLs).

    The mode is kept in the file, so this is done once per store, before its engine opens it.
    A commit in WAL mode appends to ``<file>-wal`` instead of writing and deleting a rollback
    journal: 0.34 ms against 1.5 ms on the CI machine, and the driver commits about 25 times
    per trial (Optuna and MLflow; see the benchmarks page, "The driver's cost per trial").
    Readers (``sweeps status``, the MLflow UI, optuna-dashboard) no longer wait for a commit to
    end. WAL needs every process that opens the file on one host: keep SQLite stores on a local
    disk (a cluster uses PostgreSQL). A file that cannot be switched (read only, locked past the
    timeout) is left in its mode.
    """
    path = sqlite_path(uri)
    if path is None or not path.parent.is_dir():
        return False
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            return str(con.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal"
    except sqlite3.Error as err:
        log.debug("%s left in its journal mode: %s", path, err)
        return False


def sync_on_checkpoint(engine: Any) -> None:
    """Let the connections ``engine`` opens from now on commit to a WAL-mode SQLite file without
    waiting for the disk (``PRAGMA synchronous=NORMAL``: 0.01 ms per commit against 0.34 ms).

    Used for the Optuna study only, MLflow's file keeps full sync. The file stays consistent
    after any crash and a killed process loses nothing; a power cut may undo the study's last
    commits. A trial's result is committed to MLflow before the study is told, so such a cut
    leaves what a driver killed a moment earlier leaves, and the next driver settles it the
    same way (:func:`sweeps.runner.run_sweep`: recovered from its MLflow run, or re-run).
    """
    from sqlalchemy import event

    engine.dispose()  # connections opened before the listener do not have it

    @event.listens_for(engine, "connect")
    def _normal_sync(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
