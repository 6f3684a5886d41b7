"""The driver lease (sweeps.service.lease) on the databases sweeps live in: SQLite, a journal file's
side database, and PostgreSQL. Races use separate processes, as two drivers would."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest

from sweeps.service.lease import DriverLease, LeaseHeldError, LeaseLostError, current_holder, lease_seconds


@pytest.fixture(params=["sqlite", "journal", "postgres"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    if request.param == "journal":
        return str(tmp_path / "optuna.journal.log")
    return request.getfixturevalue("postgres_url")


def stop_heartbeat(lease: DriverLease) -> None:
    """What SIGKILL or SIGSTOP does to a driver's lease: no more heartbeats (nothing released)."""
    lease._stop.set()
    lease._thread.join()


def test_second_driver_is_refused_naming_the_holder(storage):
    first = DriverLease(storage, "s", seconds=30)
    first.acquire()
    try:
        with pytest.raises(LeaseHeldError) as refused:
            DriverLease(storage, "s", seconds=30).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "since" in message
        assert "sweeps status s" in message and f"kill {os.getpid()}" in message
        holder = current_holder(storage, "s")
        assert holder.pid == os.getpid() and holder.alive()
        DriverLease(storage, "other", seconds=30).acquire()  # another sweep of the same storage is free
    finally:
        first.release()
    assert current_holder(storage, "s") is None
    again = DriverLease(storage, "s", seconds=30)
    again.acquire()
    assert again.taken_over is None  # a released lease is free, not taken over
    again.release()


def test_heartbeat_keeps_the_lease_past_its_period(storage):
    with DriverLease(storage, "s", seconds=1.0) as held:
        time.sleep(2.5)
        with pytest.raises(LeaseHeldError):
            DriverLease(storage, "s", seconds=1.0).acquire()
        held.ensure()


def test_a_silent_holder_is_taken_over_after_expiry_and_stops_without_writing(storage):
    first = DriverLease(storage, "s", seconds=1.0)
    first.acquire()
    stop_heartbeat(first)  # killed or paused
    with pytest.raises(LeaseHeldError):  # not before the expiry
        DriverLease(storage, "s", seconds=1.0).acquire()
    time.sleep(1.2)
    second = DriverLease(storage, "s", seconds=1.0)
    second.acquire()
    assert second.taken_over is not None and second.taken_over.pid == os.getpid()
    with pytest.raises(LeaseLostError, match="another driver took over"):
        first.ensure()  # what the paused driver calls before its next write
    assert first.lost
    first.release()  # gives back nothing: the lease is the second driver's now
    assert current_holder(storage, "s") is not None
    second.ensure()
    second.release()
    assert current_holder(storage, "s") is None


def _contend(storage: str, barrier, results) -> None:
    lease = DriverLease(storage, "race", seconds=30)
    barrier.wait()
    try:
        lease.acquire()
    except LeaseHeldError:
        results.put("refused")
        return
    results.put("won")
    time.sleep(1.0)  # hold while the others try
    lease.release()


def test_drivers_racing_for_one_sweep_one_wins(storage):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_contend, args=(storage, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in processes)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_lease_period_from_the_environment(monkeypatch):
    monkeypatch.setenv("SWEEPS_LEASE_SECONDS", "2.5")
    assert lease_seconds() == 2.5
    monkeypatch.setenv("SWEEPS_LEASE_SECONDS", "0")
    with pytest.raises(ValueError, match="SWEEPS_LEASE_SECONDS"):
        lease_seconds()
