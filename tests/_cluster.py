"""Test harness for the multi-node tests: real processes on loopback, started and stopped by id.

* :class:`Postgres`: fresh databases ``sweeps_test_<random>`` on the local PostgreSQL (trust
  auth), dropped afterwards.
* :class:`RayNodes`: a head and worker nodes as separate ``ray start --block`` processes, each
  with its own temp dir and ports, token auth on. Each is started in a new session, so a node is
  exactly the processes of that session (raylet, GCS, agents, Ray worker processes) and killing a
  node kills those ids: never ``ray stop``, which would hit every Ray process on the machine.
* :class:`OwnPostgres`: a PostgreSQL server of the test's own (``initdb`` + ``pg_ctl`` on a free
  port), which a test may stop and start again (a database failover).
* :class:`MlflowServer`: ``mlflow server`` with a PostgreSQL backend store and proxied artifacts
  in a local directory.

Every subprocess gets an explicit environment (:meth:`RayNodes.env`): no RAY_ADDRESS, MLflow or
sweeps settings leak in from the developer's shell, and nothing reads ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_HOST, PG_PORT, PG_USER, PG_ADMIN_DB = "127.0.0.1", 5432, "postgres", "test"
# Environment variables of the developer's shell that would redirect the processes under test.
_LEAKY_PREFIXES = ("RAY_", "MLFLOW_", "SWEEPS_", "OPTUNA_")


def session_members(session_id: int) -> list[int]:
    """Process ids whose session id is ``session_id`` (read from /proc; Linux)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session
        if int(fields[3]) == session_id:
            members.append(int(entry.name))
    return members


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str) -> None:
    """Poll ``predicate()`` until it is true; ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Process:
    """A process started in a new session, and the file holding its output."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-tail:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the session this harness started (by id).

        A session, not a process group: Ray's raylet puts each worker process in a process group
        of its own (same session), and a worker left alive would finish its task and report to
        the driver as if its node had not died.
        """
        for pid in session_members(self.popen.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> None:
        if self.alive and grace > 0:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # leftovers of the session (workers, agents)
        if self.popen.poll() is None:
            self.popen.wait(10)


def stop_all(processes: list[Process], grace: float = 5.0) -> None:
    """SIGTERM every group, give them ``grace`` seconds together, then SIGKILL what is left."""
    for process in processes:
        if process.alive:
            process.kill(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        process.stop(grace=0)


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Process:
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return Process(name, popen, log)


# --------------------------------------------------------------------------- PostgreSQL


class Postgres:
    """Fresh databases on the local PostgreSQL (trust auth). :meth:`create` returns a URL."""

    def __init__(self) -> None:
        self.created: list[str] = []

    @staticmethod
    def _connect(dbname: str = PG_ADMIN_DB):
        import psycopg2

        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)
        connection.autocommit = True
        return connection

    @classmethod
    def require(cls) -> None:
        """Skip (outside CI) or fail (in CI) when PostgreSQL is not reachable."""
        try:
            cls._connect().close()
        except Exception as err:  # psycopg2.OperationalError, or psycopg2 missing
            message = (
                f"PostgreSQL on {PG_HOST}:{PG_PORT} (user {PG_USER}, database {PG_ADMIN_DB}) is unreachable: {err}"
            )
            if os.environ.get("CI"):
                pytest.fail(message + " -- CI must provide it (.ci/run starts it)", pytrace=False)
            pytest.skip(message + " (start it, e.g. `pg_ctlcluster 15 main start`)")

    def create(self, purpose: str) -> str:
        name = f"sweeps_test_{purpose}_{secrets.token_hex(4)}"
        with closing(self._connect()) as connection, connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        # The driver named, as in deploy/: a bare postgresql:// would use psycopg 3 (also installed).
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    def drop_all(self) -> None:
        with closing(self._connect()) as connection, connection.cursor() as cursor:
            for name in self.created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@dataclass
class OwnPostgres:
    """A PostgreSQL server of the test's own, on a free loopback port, stopped and started at will.

    ``initdb``/``pg_ctl`` refuse to run as root: they run as the ``postgres`` user, in a data
    directory under /tmp it owns (its socket there too). :meth:`require` skips (outside CI) or
    fails (in CI) when that is not possible here.
    """

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sweeps-pg-", dir="/tmp")))
    port: int = field(default_factory=free_port)

    @staticmethod
    def bin_dir() -> Path | None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        return found[-1].parent if found else None

    @classmethod
    def require(cls) -> None:
        why = None
        if cls.bin_dir() is None:
            why = "PostgreSQL's initdb/pg_ctl are not installed (/usr/lib/postgresql/*/bin)"
        elif os.geteuid() != 0:
            why = "starting a PostgreSQL of the test's own needs root (to run initdb as the postgres user)"
        if why is not None:
            if os.environ.get("CI"):
                pytest.fail(why + " -- CI must provide it", pytrace=False)
            pytest.skip(why)

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        tool = str(self.bin_dir() / argv[0])
        subprocess.run(
            ["runuser", "-u", "postgres", "--", tool, *argv[1:]], check=True, capture_output=True, timeout=timeout
        )

    @property
    def data(self) -> Path:
        return self.root / "data"

    def init(self) -> OwnPostgres:
        subprocess.run(["chown", "postgres", str(self.root)], check=True)
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        with closing(self.connect("postgres")) as connection, connection.cursor() as cursor:
            cursor.execute("ALTER SYSTEM SET max_connections = 200")
        self.stop()
        return self.start()

    def start(self) -> OwnPostgres:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        """Stop at once (``-m fast``: clients are disconnected, as in a failover)."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def connect(self, dbname: str):
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=5
        )
        connection.autocommit = True
        return connection

    def create(self, name: str) -> str:
        """A new database ``name``; its SQLAlchemy URL."""
        with closing(self.connect("postgres")) as connection, connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.SubprocessError:
            pass
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


# --------------------------------------------------------------------------- Ray


@dataclass
class RayNodes:
    """A Ray cluster of separate ``ray start`` processes on 127.0.0.1, token auth on.

    Args:
        root: short directory for the nodes' temp dirs and logs (Unix socket paths must stay
            under ~100 characters, so not pytest's deep tmp_path).
        object_store_mb: object store per node.
    """

    root: Path
    object_store_mb: int = 100
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    head: Process | None = None
    workers: list[Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for any process that talks to this cluster (nodes, drivers, probes)."""
        settings = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray runs task workers at nice 15; on a shared 2-core test machine they then get a
            # sliver of CPU next to anything else running (trials 15x slower). Normal priority.
            "RAY_worker_niceness": "0",
        }
        return clean_env(**(settings | extra))

    def _spawn(self, name: str, role_args: list[str], num_cpus: int) -> Process:
        # A marker resource {name: 1} lets node_ids() tell the nodes apart (all share 127.0.0.1).
        temp_dir = self.root / name
        shutil.rmtree(temp_dir, ignore_errors=True)  # a start tried again (_start) begins afresh
        temp_dir.mkdir(parents=True)
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        argv = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            *role_args,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--block",
            f"--resources={json.dumps({name: 1})}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        return spawn(name, argv, self.env(), self.root)

    @staticmethod
    def _wait_started(nodes: list[Process], timeout: float = 180) -> None:
        def started(node: Process) -> bool:
            return "Ray runtime started" in node.output(20000) or not node.alive

        try:
            wait_for(lambda: all(started(n) for n in nodes), timeout=timeout, what="ray nodes")
        except TimeoutError:
            for node in nodes:
                node.stop()
            raise
        dead = [n for n in nodes if not n.alive]
        if dead:
            for node in nodes:
                node.stop()
            raise RuntimeError("\n".join(f"ray start ({n.name}) exited:\n{n.output()}" for n in dead))

    def _start(self, specs: Callable[[], list[tuple[str, list[str], int]]]) -> list[Process]:
        """Spawn the nodes ``specs()`` gives, ``(name, role args, CPUs)``, at once; returns when all
        started.

        Tried once more, with the specs (and so the ports) made again, when a node gave up with
        Ray's "timed out during startup" (a raylet has a fixed 30 s to register with the GCS,
        which an overloaded test machine can exceed) or found a port it was given taken (a free
        port is only free until another process binds it). Any other failure, or a second one,
        is raised.
        """
        nodes = [self._spawn(*spec) for spec in specs()]
        try:
            self._wait_started(nodes)
        except RuntimeError as err:
            if not any(why in str(err) for why in ("timed out during startup", "address already in use")):
                raise
            nodes = [self._spawn(*spec) for spec in specs()]
            self._wait_started(nodes)
        return nodes

    def start_head(self, num_cpus: int = 0, name: str = "head") -> Process:
        """Start the head; its temp dir is ``root/name`` (``name="ray"`` with ``RAY_TMPDIR=root``
        makes it the machine's default cluster for processes given that environment)."""
        tries = 0

        def spec() -> list[tuple[str, list[str], int]]:
            nonlocal tries
            tries += 1
            if tries > 1:  # a start tried again gets ports of its own (see _start)
                self.port, self.dashboard_port = free_port(), free_port()
            role = [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
            return [(name, role, num_cpus)]

        (head,) = self._start(spec)
        self.head = head
        return head

    def add_workers(self, count: int, num_cpus: int = 1) -> list[Process]:
        """Start ``count`` worker nodes at once; returns when all joined."""
        first = len(self.workers) + 1
        new = self._start(
            lambda: [(f"worker{i}", [f"--address={self.address}"], num_cpus) for i in range(first, first + count)]
        )
        self.workers.extend(new)
        return new

    def kill_node(self, node: Process) -> None:
        """SIGKILL the node's whole session (raylet, agents, its Ray worker processes)."""
        node.kill(signal.SIGKILL)
        node.popen.wait(30)

    @property
    def processes(self) -> list[Process]:
        return [*self.workers, *([self.head] if self.head else [])]

    def shutdown(self) -> None:
        stop_all(self.processes)

    def _state(self, resource: str, **params: str | int) -> list[dict]:
        query = urllib.parse.urlencode({"detail": "true", "limit": 10000, **params})
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/{resource}?{query}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.load(response)
        if not reply.get("result"):
            raise RuntimeError(f"state API: {reply.get('msg')}")
        return reply["data"]["result"]["result"]

    def node_ids(self) -> dict[str, str]:
        """Node name (``head``, ``worker1``, ...) -> Ray node id, for the nodes alive now."""
        names = {p.name for p in self.processes}
        return {
            name: node["node_id"]
            for node in self._state("nodes")
            if node["state"] == "ALIVE"
            for name in names & set(node.get("resources_total", {}))
        }

    def actor_nodes(self) -> set[str]:
        """Node ids hosting a live actor (e.g. a driver's helper actors)."""
        actors = self._state("actors", filter_keys="state", filter_predicates="=", filter_values="ALIVE")
        return {a["node_id"] for a in actors if a.get("node_id")}

    def tasks(self, name: str) -> list[dict]:
        """Every attempt of every task called ``name`` the cluster knows (Ray state API over HTTP).

        Each record has ``task_id``, ``attempt_number``, ``node_id``, ``state``, ``job_id``.
        """
        return self._state("tasks", filter_keys="name", filter_predicates="=", filter_values=name)

    def python(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a fresh Python connected to nothing yet (it calls ray.init itself)."""
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env(RAY_ADDRESS=self.address),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        return done.stdout


def make_ray_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="lsr", dir="/tmp"))


# --------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    """``mlflow server`` on a free loopback port, PostgreSQL backend, artifacts proxied to a directory."""

    backend_uri: str
    artifacts_dir: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def spawn(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # No job runner: MLflow 3 otherwise starts a dozen huey consumer processes beside the server
        # (GenAI jobs the sweeps never submit) that poll all along, CPU and memory a loaded 2-core
        # test machine does not have. The tracking and artifact APIs are the same without them.
        env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.process = spawn(f"mlflow-{self.port}", argv, env, self.log_dir)

    def wait_healthy(self, timeout: float = 180) -> None:
        try:
            wait_for(lambda: self.healthy() or not self.process.alive, timeout=timeout, what="mlflow server")
        except TimeoutError:
            self.stop()
            raise
        if not self.process.alive:
            raise RuntimeError(f"mlflow server exited:\n{self.process.output()}")

    def start(self, timeout: float = 180) -> MlflowServer:
        self.spawn()
        self.wait_healthy(timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
