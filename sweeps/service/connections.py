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
(:mod:`sweeps.trial.checkpoint`) are written by the workers: on a cluster the checkpoint folder must be
one that every node and the driver mount at the same path. A storage value that
ends in ``.log`` or ``.journal`` (or starts with ``journal://``) is an Optuna
``JournalStorage`` file instead of an RDB URL.

Writes stay inside the directories named: a sweep writes ``<dir>/mlflow.db``, ``<dir>/optuna.db``,
``<dir>/mlartifacts/<name>/`` and ``<dir>/reports/<name>/`` (the name is one safe path
component, :data:`sweeps.spec.config.NAME_RULE`); :func:`check_inside` refuses an entry among those
that is a symbolic link leading out of ``<dir>``.

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
from collections.abc import Callable, Mapping
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
        checkpoint_dir: the folder of trial checkpoints (absolute; :mod:`sweeps.trial.checkpoint`).
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
            "ray": redact(self.address) if self.address else _private_ray(),
            "checkpoints": str(self.checkpoint_dir),
        }


def _private_ray() -> str:
    live = local_cluster()
    if live is None:
        return "local (started by this process)"
    return (
        f"local (a private Ray started by this process; the Ray cluster at {live} on this machine is left "
        "alone: --address auto uses it)"
    )


def local_cluster(timeout: float = 1.0) -> str | None:
    """The address of a live cluster that ``ray start`` left on this machine, else ``None``.

    Read from Ray's ``ray_current_cluster`` file (in ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``,
    else ``/tmp/ray``, as Ray looks it up); a file whose cluster no longer answers is stale and
    ignored. ``sweeps run`` without ``--address`` never joins such a cluster (see
    :func:`sweeps.runner.run_sweep`): it starts a private one.
    """
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        address = (Path(base) / "ray" / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        return None
    return address


def is_journal_storage(storage: str) -> bool:
    return storage.startswith("journal://") or storage.endswith((".log", ".journal"))


def journal_path(storage: str) -> Path:
    return Path(storage.removeprefix("journal://")).expanduser()


#: The environment variables that name each location, in order of precedence (after the flag).
ENVIRONMENT = {
    "results_dir": ("SWEEPS_RESULTS_DIR",),
    "tracking_uri": ("SWEEPS_TRACKING_URI", "MLFLOW_TRACKING_URI"),
    "storage": ("SWEEPS_STORAGE",),
    "address": ("RAY_ADDRESS",),
}


def named(what: str, value: str | Path | None, env: Mapping[str, str | None]) -> str | None:
    """The location ``what`` (a key of :data:`ENVIRONMENT`) as the flag ``value`` or, failing it,
    the environment ``env`` names it; ``None`` when neither does (the default applies)."""
    if value:
        return str(value)
    return next((env[k] for k in ENVIRONMENT[what] if env.get(k)), None)


def job_locations(
    *,
    tracking_uri: str | None,
    storage: str | None,
    results_dir: str | None,
    env: Mapping[str, str | None],
    cluster_env: Callable[[], Mapping[str, str | None]],
) -> dict[str, str]:
    """The store flags ``sweeps submit`` passes to the job's ``sweeps run``: each location as the
    flag or, failing it, the submitting shell's ``env`` names it (:func:`named`, the rule of
    ``sweeps run``). A job runs in a temporary working directory that Ray deletes, so when the
    tracking URI or the storage is named by neither the submitter nor the cluster's own environment
    (``cluster_env()``, asked only then), the results directory holding their defaults must be an
    absolute path (outside that directory); otherwise :class:`~sweeps.spec.errors.UsageError`.
    """
    from ..spec.errors import UsageError

    passed = {
        what: v
        for what, value in (("tracking_uri", tracking_uri), ("storage", storage), ("results_dir", results_dir))
        if (v := named(what, value, env))
    }

    def absolute(directory: str | None) -> bool:
        return directory is not None and Path(directory).expanduser().is_absolute()

    if ("tracking_uri" in passed and "storage" in passed) or absolute(passed.get("results_dir")):
        return passed  # the job's defaults, if any apply, are under an absolute results directory
    remote = cluster_env()
    missing = [w for w in ("tracking_uri", "storage") if w not in passed and not named(w, None, remote)]
    directory = passed.get("results_dir") or named("results_dir", None, remote)
    if missing and not absolute(directory):
        flags = " and ".join(f"--{w.replace('_', '-')}" for w in missing)
        names = " / ".join(k for w in missing for k in ENVIRONMENT[w])
        where = f" ({directory!r} is relative: inside it)" if directory else ""
        raise UsageError(
            f"{flags}: named neither here nor in the cluster's environment, so the job would record into Ray's "
            f"temporary working directory{where}, deleted after the job; pass {flags} (or export {names}), or "
            "--results-dir with an absolute path on the head node"
        )
    return passed


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
    directory = Path(named("results_dir", results_dir, env) or DEFAULT_RESULTS_DIR).expanduser().resolve()
    if create:
        directory.mkdir(parents=True, exist_ok=True)

    tracking = named("tracking_uri", tracking_uri, env) or f"sqlite:///{directory / 'mlflow.db'}"
    _check_uri("--tracking-uri", tracking, ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks"))

    study_storage = named("storage", storage, env) or f"sqlite:///{directory / 'optuna.db'}"
    if not is_journal_storage(study_storage):
        _check_uri("--storage", study_storage, ("sqlite", "postgresql", "mysql", "oracle", "mssql"))

    ray_address = named("address", address, env)
    local_store = urlsplit(tracking).scheme in ("sqlite", "file", "postgresql", "mysql")
    artifact_root = (directory / "mlartifacts").as_uri() if local_store else None
    from ..trial.checkpoint import DIRECTORY, ENV

    checkpoints = Path(env.get(ENV) or directory / DIRECTORY).expanduser().resolve()
    return Connections(directory, tracking, study_storage, ray_address, artifact_root, checkpoints)


def _check_uri(flag: str, uri: str, schemes: tuple[str, ...]) -> None:
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in schemes:
        raise ValueError(
            f"{flag}: unsupported URI {redact(uri)!r}; use one of the schemes {', '.join(schemes)}"
            " (e.g. sqlite:////abs/path.db or postgresql://user@host/db)"
        )


def _writable_dir(path: Path) -> bool:
    """Whether ``path`` can be created or written: its nearest existing ancestor is writable."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK)
    return False


def check_reachable(conn: Connections, timeout: float = 5.0) -> None:
    """Fail fast with ``ConnectionError`` (message redacted, naming the flag) if a store cannot be used.

    Local files (sqlite, journal) need a writable directory (created on first use); database
    servers (PostgreSQL, MySQL) must answer and hold the named database (:func:`check_database`);
    an HTTP tracking server needs an open TCP port. Creates nothing.
    """
    for flag, uri in (("--tracking-uri", conn.tracking_uri), ("--storage", conn.storage)):
        if flag == "--storage" and conn.is_journal:
            parent = journal_path(uri).parent
            if not _writable_dir(parent):
                raise ConnectionError(f"{flag}: directory {parent} is not writable")
            continue
        parts = urlsplit(uri)
        if parts.scheme.startswith("sqlite"):
            path = sqlite_path(uri)
            if path is not None and not _writable_dir(path.parent):
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
        if parts.scheme.split("+")[0] in ("postgresql", "mysql"):
            check_database(flag, uri, timeout)


def check_database(flag: str, uri: str, timeout: float = 5.0) -> None:
    """Connect to the database server of ``uri`` once; ``ConnectionError`` naming ``flag`` and the
    fix when the database does not exist or the server refuses the login. Creates nothing."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    args = {"connect_timeout": int(max(1, timeout))} if url.get_backend_name() in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    try:
        engine.connect().close()
    except sqlalchemy.exc.DBAPIError as err:
        reason = " ".join(str(err.orig).split())
        where = f"{url.host or 'localhost'}:{url.port or ''}".rstrip(":")
        if "does not exist" in reason or "Unknown database" in reason:
            create = (
                f"createdb -h {url.host or 'localhost'} -p {url.port or 5432} -U {url.username or 'postgres'} "
                f"{url.database}"
                if url.get_backend_name() == "postgresql"
                else f"CREATE DATABASE {url.database}"
            )
            raise ConnectionError(
                f"{flag}: database {url.database!r} does not exist on {where}; create it "
                f"(`{create}`) or name an existing one in {redact(uri)}"
            ) from None
        raise ConnectionError(f"{flag}: cannot open {redact(uri)}: {redact(reason)}") from None
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise ConnectionError(f"{flag}: cannot open {redact(uri)}: {type(err).__name__}: {redact(str(err))}") from None
    finally:
        engine.dispose()


def written_paths(results_dir: Path, name: str) -> list[Path]:
    """What a sweep ``name`` writes under ``results_dir`` with the embedded stores (see the module docstring)."""
    return [
        results_dir / "mlflow.db",
        results_dir / "optuna.db",
        results_dir / "mlartifacts",
        results_dir / "mlartifacts" / name,
        results_dir / "reports",
        results_dir / "reports" / name,
    ]


def check_inside(directory: Path, paths: list[Path], flag: str) -> None:
    """:class:`~sweeps.spec.errors.UsageError` (a ``ValueError``) naming ``flag`` if one of ``paths``
    (inside ``directory``) is a symbolic link whose target lies outside ``directory``: a write
    through it would land elsewhere."""
    from ..spec.errors import UsageError

    base = Path(directory).resolve()
    for path in paths:
        if path.is_symlink() and not path.resolve().is_relative_to(base):
            raise UsageError(
                f"{flag}: {path} is a symbolic link to {path.resolve()}, outside {base}; sweeps write "
                "only inside the directory named: remove the link, or name that directory itself"
            )


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
