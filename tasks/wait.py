"""Step 5, wait: watch a run's batches together until one of them is finished.

One task looks at every running batch of the run at each poll, so a finished batch is
noticed within one poll interval, not at the end of its own doubling timer. The task
sleeps between polls instead of failing and being retried: in the Prefect UI a waiting
run shows one running task, and its log says what moved, not "Task run failed". It
takes and returns plain values (batch ids, batches), so it holds no state of the flow.
"""

from __future__ import annotations

import time

from openai.types import Batch
from prefect import get_run_logger

from enrichflow.errors import ProviderError
from enrichflow.providers import BatchAPI
from enrichflow.tasks import as_task, watch
from enrichflow.tasks.api import RETRIES

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
REPORT_SECONDS = 600  # hand the request counts back to the flow (journal, UI) this often
LOG_SECONDS = 60  # log moving request counts at most this often (a new status at once)
UNREACHABLE_SECONDS = 900  # give up on a provider that does not answer for this long


def look_at_batches(client: BatchAPI, batch_ids: list[str]) -> list[Batch]:
    """The batches as they are now (in as few calls as the provider allows: twenty
    running shards are not twenty requests a poll, under its rate limits)."""
    return client.look(batch_ids)


def wait_for_batches(client: BatchAPI, batch_ids: list[str], poll_min: float, poll_max: float,
                     max_wait_hours: float, report_seconds: float = REPORT_SECONDS
                     ) -> list[Batch]:
    """The batches as soon as one of them is finished, or after `report_seconds`: the flow
    journals their request counts, collects the finished ones and calls again. Polls
    every `poll_min` seconds while the batches move, backing off to `poll_max` while
    they do not; a batch that runs longer than `max_wait_hours` is given up with an error
    that says it runs on."""
    log = get_run_logger()
    started = time.monotonic()
    delay, reached, logged = poll_min, started, 0.0
    last_statuses: list[str] = []
    last_done: list[int] = []
    while True:
        try:
            batches = look_at_batches(client, batch_ids)
            reached = time.monotonic()
        except client.transient as exc:
            if time.monotonic() - reached > UNREACHABLE_SECONDS:
                raise ProviderError(
                    f"the Batch API at {client.base_url} did not answer for "
                    f"{UNREACHABLE_SECONDS // 60} minutes ({type(exc).__name__}); its batches "
                    "go on there: run the job again to re-attach to them") from exc
            log.warning("cannot reach the Batch API (%s); trying again in %.0f s",
                        type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, poll_max)
            continue
        watch.polled(batches)
        statuses, done = [b.status for b in batches], [_done(b) for b in batches]
        now = time.monotonic()
        moved = statuses != last_statuses or done != last_done
        if statuses != last_statuses or (done != last_done and now - logged >= LOG_SECONDS):
            log.info("; ".join(f"batch {b.id} is {client.state_name(b.status)}{_progress(b)}"
                               for b in batches))
            logged = now
        last_statuses, last_done = statuses, done
        if any(b.status in TERMINAL for b in batches) or now - started >= report_seconds:
            return batches
        check_age(batches, max_wait_hours)
        delay = poll_min if moved else min(delay * 2, poll_max)
        time.sleep(delay)


def check_age(batches: list[Batch], max_wait_hours: float) -> None:
    """Give up, saying that they run on, batches older than `max_wait_hours`."""
    if time.time() - oldest_start(batches) > max_wait_hours * 3600:
        raise ProviderError(f"batch(es) {', '.join(b.id for b in batches)} still running after "
                           f"limits.max_wait_hours ({max_wait_hours:g} h); they go on at the "
                           "provider: run the job again later to collect them")


def oldest_start(batches: list[Batch]) -> float:
    return min(b.created_at for b in batches)


def _done(batch: Batch) -> int:
    counts = batch.request_counts
    return counts.completed + counts.failed if counts else 0


def _progress(batch: Batch) -> str:
    counts = batch.request_counts
    return f", {_done(batch):,}/{counts.total:,} requests done" if counts else ""


wait_for_batches_task = as_task(wait_for_batches, "wait for batches")
look_at_batches_task = as_task(look_at_batches, "look at batches", **RETRIES)
