"""One run per output at a time: a lease in `<output>/_state/lease.json`.

Two runs of the same job started together would each create a batch for the same shard
and pay twice. So a run first creates the lease, exclusively (O_EXCL on local disk, a
conditional put on S3), and keeps it fresh with a heartbeat; a second run is refused with
who holds it and since when, or waits for it. A lease whose holder is gone (its process
is dead on this host, or its heartbeat is older than STALE_SECONDS; an empty or unreadable
lease, cut short by a kill, older than a heartbeat) is taken over by replacing exactly the
lease that was judged gone (`Location.replace_json`): of several runs taking it over at
once, one wins and the others find it held. Heartbeats replace it the same way, so a run
whose lease was taken over finds out instead of writing over the new holder's. The
journal is written only while the lease is held (`RunState.save` checks it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from enrichflow.errors import LeaseError, StorageError
from enrichflow.storage import Location, Versioned

LEASE_FILE = "_state/lease.json"
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 90.0
WAIT_SECONDS = 5.0


class Lease:
    """The lease of one run; a context manager that holds it until the run ends."""

    def __init__(self, location: Location, holder: dict[str, Any]):
        self.location = location
        self.holder = holder
        self.lost_to: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="enrichflow-lease",
                                         daemon=True)
        self._beating.start()

    @classmethod
    def acquire(cls, location: Location, run: str, wait: bool = False,
                on_wait: Callable[[str], None] | None = None) -> Lease:
        """The lease of `location` for `run`; raises LeaseError while another live run
        holds it, or, with `wait`, waits until it is free (telling `on_wait` once)."""
        holder = {"id": uuid.uuid4().hex, "run": run, "host": socket.gethostname(),
                  "pid": os.getpid(), "since": time.time()}
        told = False
        while True:
            if location.create_json(LEASE_FILE, {**holder, "heartbeat": time.time()}):
                return cls(location, holder)
            seen = location.read_versioned(LEASE_FILE)
            if seen is None:
                continue  # released between our two looks
            if _holder_is_gone(seen):
                if location.replace_json(LEASE_FILE, {**holder, "heartbeat": time.time()},
                                         seen.version):
                    return cls(location, holder)
                continue  # another run took it over first, or its holder beat: look again
            if not isinstance(seen.value, dict):  # being created: written in an instant
                time.sleep(0.05)
                continue
            if not wait:
                raise LeaseError(f"{location.uri} is being written by another run: "
                                 f"{describe(seen.value)}. Wait for it to end, run again with "
                                 f"--wait-for-lock, or stop it (enrichflow cancel "
                                 f"{location.uri})")
            if on_wait and not told:
                on_wait(f"waiting for the other run of {location.uri} to end: "
                        f"{describe(seen.value)}")
                told = True
            time.sleep(WAIT_SECONDS)

    def check(self) -> None:
        """Raise LeaseError if another run took the lease over (this one looked dead)."""
        if self.lost_to is not None:
            raise LeaseError(f"this run lost its lease on {self.location.uri} to "
                             f"{describe(self.lost_to)}; it stops before doing anything more")

    def release(self) -> None:
        self._stop.set()
        self._beating.join()
        seen = self.location.read_versioned(LEASE_FILE)
        if seen and _holder_id(seen) == self.holder["id"]:
            self.location.remove(LEASE_FILE)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                seen = self.location.read_versioned(LEASE_FILE)
                if seen is None or _holder_id(seen) != self.holder["id"] or \
                        not self.location.replace_json(
                            LEASE_FILE, {**self.holder, "heartbeat": time.time()},
                            seen.version):
                    taker = self.location.read_versioned(LEASE_FILE)
                    self.lost_to = (taker and taker.value) or {
                        "run": "nobody (the lease was removed)"}
                    return
            except StorageError:
                continue  # a storage hiccup: the next beat tries again


def drop_own_lease(location: Location) -> None:
    """Remove the lease of `location` if this process holds it: for a process that ends
    without unwinding (Ctrl-C), so that the next run, from any host, finds it free."""
    seen = location.read_versioned(LEASE_FILE)
    lease = seen.value if seen else None
    if isinstance(lease, dict) and lease.get("pid") == os.getpid() and \
            lease.get("host") == socket.gethostname():
        location.remove(LEASE_FILE)


def _holder_id(seen: Versioned) -> str | None:
    return seen.value.get("id") if isinstance(seen.value, dict) else None


def _holder_is_gone(seen: Versioned) -> bool:
    lease = seen.value
    if not isinstance(lease, dict):  # empty or cut short: its writer died if it is not new
        return seen.age > HEARTBEAT_SECONDS
    if time.time() - lease.get("heartbeat", 0) > STALE_SECONDS:
        return True
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(lease: dict[str, Any]) -> str:
    """Who holds a lease, for messages."""
    if "pid" not in lease:
        return lease.get("run", "?")
    since = datetime.fromtimestamp(lease["since"], UTC).isoformat(timespec="seconds")
    beat = time.time() - lease["heartbeat"]
    return (f"{lease['run']}, process {lease['pid']} on {lease['host']}, since {since}, "
            f"last heartbeat {beat:.0f} s ago")
