"""One run per output: the lease on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from enrichflow.errors import LeaseError, StorageError
from enrichflow.storage import Location
from enrichflow.tasks import lease as lease_module
from enrichflow.tasks.lease import LEASE_FILE, STALE_SECONDS, Lease


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_is_refused_with_who_holds_the_lease(location):
    with Lease.acquire(location, "run one"):
        with pytest.raises(LeaseError) as refused:
            Lease.acquire(location, "run two")
        message = str(refused.value)
        assert message.startswith(f"{location.uri} is being written by another run: run one, "
                                  f"process {os.getpid()} on "
                                  f"{socket.gethostname()}, since ")
        assert f"run again with --wait-for-lock, or stop it (enrichflow cancel " \
               f"{location.uri})" in message
    with Lease.acquire(location, "run two"):  # released at the end of the first
        pass
    assert not location.exists(LEASE_FILE)


@pytest.mark.parametrize("gone", ["dead process here", "stale heartbeat elsewhere"])
def test_a_lease_whose_holder_is_gone_is_taken_over(location, gone):
    now = time.time()
    held = {"id": "old", "run": "a killed run", "since": now - 1000}
    if gone == "dead process here":
        held |= {"host": socket.gethostname(), "pid": a_dead_pid(), "heartbeat": now}
    else:
        held |= {"host": "another-host", "pid": 1, "heartbeat": now - STALE_SECONDS - 1}
    location.create_json(LEASE_FILE, held)
    with Lease.acquire(location, "the next run") as lease:
        assert location.read_json(LEASE_FILE)["id"] == lease.holder["id"]


def test_a_live_holder_elsewhere_is_waited_for(location):
    location.create_json(LEASE_FILE, {"id": "x", "run": "a run elsewhere", "host": "another-host",
                                      "pid": 1, "since": time.time(), "heartbeat": time.time()})
    with pytest.raises(LeaseError, match="a run elsewhere, process 1 on another-host"):
        Lease.acquire(location, "this run")


def test_a_run_that_lost_its_lease_stops(location, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_SECONDS", 0.05)
    lease = Lease.acquire(location, "a slow run")
    location.write_json(LEASE_FILE, {"id": "other", "run": "the run that took it over"})
    deadline = time.monotonic() + 10
    while lease.lost_to is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(LeaseError, match="lost its lease .* to the run that took it over"):
        lease.check()
    lease.release()
    assert location.read_json(LEASE_FILE)["id"] == "other", "not removed: it is not ours"


TAKERS, ROUNDS = 8, 100


def take_over_in_rounds(uri: str, options: dict | None, taker: int, barrier, outcomes) -> None:
    """One of the processes of the test below: each round, once the dead lease is laid,
    try to take it over; say what happened; let go of it once every taker has said."""
    location = Location(uri, options)
    for round_ in range(ROUNDS):
        barrier.wait()
        lease = None
        try:
            lease = Lease.acquire(location, f"taker {taker}")
            outcome = "held"
        except LeaseError:
            outcome = "refused"
        except Exception as exc:  # noqa: BLE001 - what the test counts as a crash
            outcome = f"crashed: {exc!r}"
        outcomes.put((round_, outcome))
        barrier.wait()
        if lease is not None:
            lease.release()
        barrier.wait()


def test_of_many_runs_taking_over_a_dead_lease_at_once_exactly_one_holds_it(location):
    """8 processes released together on the same dead lease, 100 rounds: one holder a
    round, the others refused, none crashed (on local disk and on S3)."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    barrier, outcomes = spawn.Barrier(TAKERS + 1, timeout=120), spawn.Queue()
    options = None if location.is_local else {"endpoint_url": location.fs.endpoint_url}
    takers = [spawn.Process(target=take_over_in_rounds,
                            args=(location.uri, options, taker, barrier, outcomes))
              for taker in range(TAKERS)]
    for process in takers:
        process.start()
    dead = {"host": socket.gethostname(), "pid": a_dead_pid(), "heartbeat": time.time()}
    stale = {"host": "another-host", "pid": 1, "heartbeat": time.time() - STALE_SECONDS - 1}
    try:
        for round_ in range(ROUNDS):
            location.write_json(LEASE_FILE, {"id": f"dead {round_}", "run": "a killed run",
                                             "since": 0.0, **(dead if round_ % 2 else stale)})
            barrier.wait()
            seen = sorted(outcomes.get(timeout=120) for _ in range(TAKERS))
            assert [outcome for _, outcome in seen] == ["held"] + ["refused"] * (TAKERS - 1), \
                f"round {round_}: {seen}"
            barrier.wait()
            barrier.wait()
    finally:
        for process in takers:
            process.join(timeout=30)
            process.kill()


def test_an_empty_lease_left_by_a_kill_is_taken_over(location, monkeypatch):
    """A kill between the lease's exclusive create and its write leaves it empty: once it
    is older than a heartbeat, it is a dead holder's, not a storage failure."""
    monkeypatch.setattr(lease_module, "HEARTBEAT_SECONDS", 0.2)
    location.write_bytes(LEASE_FILE, b"")
    time.sleep(0.5)
    with Lease.acquire(location, "the next run") as lease:
        assert location.read_json(LEASE_FILE)["id"] == lease.holder["id"]
    assert not location.exists(LEASE_FILE)


def test_a_lease_removed_twice_at_once_is_no_error(location):
    location.write_json(LEASE_FILE, {"id": "x"})
    location.remove(LEASE_FILE)
    location.remove(LEASE_FILE)  # as a second remover finds it: already removed
    assert not location.exists(LEASE_FILE)


def test_a_conditional_put_answered_409_is_tried_again(s3_location, conditional_put_in_flight):
    """While another conditional write of the lease is in flight S3 may answer 409
    ConditionalRequestConflict: the take-over waits it out, then wins or loses by its
    condition, never by the conflict."""
    s3_location.write_json(LEASE_FILE, {"id": "dead"})
    seen = s3_location.read_versioned(LEASE_FILE)
    with conditional_put_in_flight:
        outcome = []
        taking = threading.Thread(target=lambda: outcome.append(
            s3_location.replace_json(LEASE_FILE, {"id": "mine"}, seen.version)))
        taking.start()
        time.sleep(0.3)  # answered 409 meanwhile
        assert not outcome
    taking.join(timeout=10)
    assert outcome == [True] and s3_location.read_json(LEASE_FILE) == {"id": "mine"}
    assert not s3_location.create_json(LEASE_FILE, {"id": "late"})
    s3_location.remove(LEASE_FILE)
    assert not s3_location.replace_json(LEASE_FILE, {"id": "mine"}, seen.version)


def test_a_conflict_that_does_not_end_is_a_storage_error(s3_location, conditional_put_in_flight):
    with conditional_put_in_flight, pytest.raises(StorageError, match="409 "
                                                   "ConditionalRequestConflict"):
        s3_location.create_json(LEASE_FILE, {"id": "mine"})
    assert not s3_location.exists(LEASE_FILE)
