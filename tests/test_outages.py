"""Riding out store outages, piece by piece (sweeps.service.outages, the retrying Optuna storage, the
recorder's retried writes); tests/test_store_outage.py stops real databases and servers."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import requests
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from sweeps.adapters import optuna_adapter
from sweeps.service import search
from sweeps.service.outages import (
    StoreGuard,
    StoreUnavailableError,
    is_unreachable,
    retry_seconds,
    short_mlflow_http_retries,
)
from sweeps.service.recorder import MlflowRecorder
from sweeps.service.records import FinalRecord
from sweeps.service.tracking import Tracker
from sweeps.spec.status import TrialStatus


def refused() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


class Clock:
    """A fake monotonic clock that sleeping advances."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def guard(limit: float = 60.0, **kwargs) -> tuple[StoreGuard, Clock, list[str]]:
    clock, lines = Clock(), []
    return StoreGuard("Optuna storage db", limit, lines.append, clock=clock, sleep=clock.sleep, **kwargs), clock, lines


def flaky(failures: int, error_factory=refused):
    """A function that raises ``failures`` times, then returns how often it was called."""
    calls = []

    def fn() -> int:
        calls.append(1)
        if len(calls) <= failures:
            raise error_factory()
        return len(calls)

    return fn


# --------------------------------------------------------------------------- what counts as unreachable


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException:
            raise error  # noqa: B904 - the implicit context is what is tested
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    "error",
    [
        refused(),
        sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")),
        sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True),
        optuna.exceptions.StorageInternalError("An exception is raised during the commit"),
        MlflowException("database down", error_code=TEMPORARILY_UNAVAILABLE),
        requests.exceptions.ConnectionError("refused"),
        requests.exceptions.RetryError("too many 503 error responses"),
        ConnectionRefusedError(111, "Connection refused"),
    ],
    ids=["operational", "interface", "invalidated", "optuna-commit", "mlflow-503", "http", "http-5xx", "socket"],
)
def test_store_errors_that_say_unreachable(error):
    if isinstance(error, optuna.exceptions.StorageInternalError):  # Optuna raises it from the SQLAlchemy error
        error.__cause__ = refused()
    assert is_unreachable(error)


def test_mlflow_http_failure_is_unreachable_through_its_context():
    # MlflowException("API request to ... failed with exception ...") raised while handling requests' error
    error = _raised_from(MlflowException("API request to http://h/api failed"), requests.exceptions.ConnectionError())
    assert is_unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")),
        MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST),
        optuna.exceptions.StorageInternalError("a refused write"),  # no database error under it
        StoreUnavailableError("s", 5, 5, "V", refused()),  # a guard that gave up: not retried by another
    ],
)
def test_errors_that_are_answers_are_not_retried(error):
    assert not is_unreachable(error)


def test_the_log_names_the_lost_connection_not_its_wrapper():
    g, _, lines = guard()
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = refused()
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            raise wrapped

    g.call(fn)
    assert "(OperationalError: (builtins.ConnectionRefusedError) connection refused)" in lines[0], lines[0]


def test_mlflow_http_retries_are_short_while_a_driver_runs(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")  # the user's setting wins
    with short_mlflow_http_retries():
        from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 3
    import os

    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "3"


# --------------------------------------------------------------------------- the guard


def test_guard_retries_until_the_store_is_back_and_logs_the_outage_once():
    g, clock, lines = guard()
    assert g.call(flaky(5)) == 6
    assert len(lines) == 2, lines
    assert lines[0].startswith("Optuna storage db: unreachable (OperationalError") and "up to 60 s" in lines[0]
    assert lines[1] == f"Optuna storage db: reachable again after {clock.now:.1f} s"
    assert clock.slept[0] == pytest.approx(0.5, rel=0.21) and clock.slept[3] == pytest.approx(4, rel=0.21)
    assert g.down_since is None and g.outages == 1
    assert g.call(lambda: "fine") == "fine" and len(lines) == 2  # no outage, no line


def test_guard_waits_at_most_the_longest_wait():
    g, clock, _ = guard(limit=1000)
    g.call(flaky(12))
    assert max(clock.slept) <= 15 * 1.2


def test_guard_gives_up_past_the_limit_and_then_fails_fast():
    g, clock, lines = guard(limit=20)
    with pytest.raises(StoreUnavailableError) as caught:
        g.call(flaky(1000))
    assert 20 <= clock.now <= 20.001  # the last wait is cut to the limit
    message = str(caught.value)
    assert message.startswith("Optuna storage db: unreachable for 20 s, past the limit of 20 s")
    assert "SWEEPS_STORE_RETRY_SECONDS" in message and "connection refused" in message
    assert isinstance(caught.value.__cause__, sqlalchemy.exc.OperationalError)
    slept = len(clock.slept)
    with pytest.raises(StoreUnavailableError):
        g.call(flaky(1))
    assert len(clock.slept) == slept  # no more waiting once given up
    assert g.call(lambda: 1) == 1  # a store that answers is still used


def test_guard_does_not_retry_other_errors():
    g, clock, lines = guard()
    with pytest.raises(ValueError):
        g.call(flaky(1, lambda: ValueError("bad")))
    assert clock.slept == [] and lines == []


def test_guard_with_limit_zero_does_not_retry():
    g, clock, _ = guard(limit=0)
    with pytest.raises(StoreUnavailableError):
        g.call(flaky(1))
    assert clock.slept == []


def test_guard_stops_waiting_on_ctrl_c():
    class Stop:
        requested = False

    stop = Stop()
    g, clock, _ = guard(stop=stop)
    fn = flaky(1000)

    def press_after_three(seconds: float) -> None:
        clock.sleep(seconds)
        stop.requested = len(clock.slept) >= 3

    g.sleep = press_after_three
    with pytest.raises(StoreUnavailableError):
        g.call(fn)
    assert len(clock.slept) == 3


def test_one_outage_for_all_threads():
    lines: list[str] = []
    g = StoreGuard("MLflow tracking store x", 60, lines.append, sleep=lambda s: time.sleep(0.001))
    state = {"down": True}
    barrier = threading.Barrier(4)

    def write() -> None:
        barrier.wait()
        g.call(lambda: (_ for _ in ()).throw(refused()) if state["down"] else None)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    threading.Timer(0.2, lambda: state.update(down=False)).start()
    for thread in threads:
        thread.join(10)
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["unreachable", "reachable"], lines


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_retry_limit_from_the_environment_is_checked(monkeypatch, value):
    monkeypatch.setenv("SWEEPS_STORE_RETRY_SECONDS", value)
    with pytest.raises(ValueError, match="SWEEPS_STORE_RETRY_SECONDS: must be a number of seconds >= 0"):
        retry_seconds("SWEEPS_STORE_RETRY_SECONDS", 600)
    monkeypatch.setenv("SWEEPS_STORE_RETRY_SECONDS", "30")
    assert retry_seconds("SWEEPS_STORE_RETRY_SECONDS", 600) == 30


# --------------------------------------------------------------------------- the retrying Optuna storage


class Outage:
    """A retry policy for tests: the first try of each listed method fails as a lost connection,
    before or after the real call (``after``: written, answer lost)."""

    def __init__(self, names: set[str], after: bool = False) -> None:
        self.names, self.after, self.failed = names, after, []
        self.guard = StoreGuard("Optuna storage test", 60, lambda line: None, sleep=lambda s: None)

    def __call__(self, fn, *args, **kwargs):
        name = getattr(fn, "__name__", "")
        tries = []

        def once():
            tries.append(1)
            first = len(tries) == 1 and (
                name in self.names or (name == "finish" and "set_trial_state_values" in self.names)
            )
            if first and not self.after:
                self.failed.append(name)
                raise refused()
            result = fn(*args, **kwargs)
            if first:
                self.failed.append(name)
                raise refused()
            return result

        return self.guard.call(once)


@pytest.mark.lowest
@pytest.mark.parametrize("after", [False, True], ids=["lost-before-write", "written-answer-lost"])
def test_retrying_storage_gives_one_trial_per_ask_and_one_tell(tmp_path, after):
    names = {"set_trial_state_values", "set_trial_user_attr", "get_trial", "set_study_user_attr"}
    if not after:
        names.add("create_new_trial")  # creating again after a written try would make a second trial
    outage = Outage(names, after=after)
    storage = optuna_adapter.retrying_storage(search.make_storage(f"sqlite:///{tmp_path}/s.db"), outage)
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr("kind", "test")
    for i in range(3):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("i", i)
        study.tell(trial, x)
    assert "set_trial_state_values" in outage.failed or "finish" in outage.failed
    fresh = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    assert [t.state for t in fresh.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.user_attrs["i"] for t in fresh.trials] == [0, 1, 2]
    assert fresh.user_attrs == {"kind": "test"}


def test_retrying_storage_still_refuses_a_trial_finished_otherwise(tmp_path):
    storage = optuna_adapter.retrying_storage(search.make_storage(f"sqlite:///{tmp_path}/s.db"), Outage(set()))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(optuna_adapter.UpdateFinishedTrialError):  # first try, not a retry: another writer's
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [1.0])


# --------------------------------------------------------------------------- the recorder's retried writes


class WrittenThenLost:
    """Each write is done, then its first try reports a lost connection (the worst case)."""

    def __init__(self) -> None:
        self.guard = StoreGuard("MLflow tracking store test", 60, lambda line: None, sleep=lambda s: None)
        self.lost = 0

    def __call__(self, write, *args):
        tries = []

        def once():
            tries.append(1)
            result = write(*args)
            if len(tries) == 1:
                self.lost += 1
                raise MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE)
            return result

        return self.guard.call(once)


def test_recorder_writes_each_run_and_value_once_when_answers_are_lost(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, str(tmp_path / "artifacts"))
    parent = tracker.start_parent("s", flat_config={"train.lr": 0.1}, resolved_config={}, config_yaml="name: s\n")
    retry = WrittenThenLost()
    recorder = MlflowRecorder(tracker, "s", parent, before_final=lambda: None, retry=retry)
    recorder.start(0, {"train.lr": 0.1})
    (started,) = recorder.started()
    record = FinalRecord(TrialStatus.CONVERGED, {"test_acc": 0.9, "train_loss": 0.01}, {"result.json": b"{}"})
    recorder.finish(0, record, step=10)
    assert recorder.written(wait=True) == [(0, record)]
    assert retry.lost == 2  # the run's creation and its final record

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], "tags.`sweeps.role` = 'trial'")
    assert [r.info.run_id for r in runs] == [started[1]]  # one run, not one per try
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["status"] == "converged"
    assert runs[0].data.params == {"train.lr": "0.1"}
    assert len(client.get_metric_history(started[1], "test_acc")) == 1  # the retry kept its timestamp


def test_reads_wait_for_the_store_up_to_their_own_limit(monkeypatch, caplog):
    from sweeps.service.outages import retrying_read

    fn = flaky(1)

    @retrying_read
    def sweep_status() -> int:
        return fn()

    assert sweep_status() == 2
    assert "the sweep's stores (read by sweep_status): unreachable" in caplog.text
    monkeypatch.setenv("SWEEPS_READ_RETRY_SECONDS", "0")
    fn = flaky(1)
    with pytest.raises(StoreUnavailableError, match="SWEEPS_READ_RETRY_SECONDS"):
        sweep_status()
