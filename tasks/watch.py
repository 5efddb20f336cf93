"""Who follows a run from inside its own process: the progress bar of the Python API and
of the CLI on a terminal (`enrichflow.progress`).

The flow tells them, as it happens, what the UI's artifacts and the log show: the
estimate before sending, and every batch at every poll. A run with no one watching (a
deployment, the CLI writing to a file) tells no one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from openai.types import Batch

    from enrichflow.tasks.estimate import Estimate


class Watcher(Protocol):
    def estimated(self, estimate: Estimate) -> None: ...

    def polled(self, batches: list[Batch]) -> None: ...

    def answered(self, requests: int) -> None: ...


_WATCHERS: list[Watcher] = []


@contextmanager
def watching(watcher: Watcher) -> Iterator[None]:
    """`watcher` hears of the runs of this process while the block runs."""
    _WATCHERS.append(watcher)
    try:
        yield
    finally:
        _WATCHERS.remove(watcher)


def estimated(estimate: Estimate) -> None:
    for watcher in list(_WATCHERS):
        watcher.estimated(estimate)


def polled(batches: list[Batch]) -> None:
    for watcher in list(_WATCHERS):
        watcher.polled(batches)


def answered(requests: int) -> None:
    """`requests` were answered outside any batch (a synchronous canary's sample)."""
    for watcher in list(_WATCHERS):
        watcher.answered(requests)
