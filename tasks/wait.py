"""Step 5, wait: look at a batch once; raise while it is not finished, so Prefect retries.

The waiting itself is the task's retry policy (delays from the job's poll bounds), which
makes every poll visible in the Prefect UI and survives worker restarts.
"""

from __future__ import annotations

from uuid import UUID

from openai import OpenAI
from openai.types import Batch
from prefect import get_run_logger
from prefect.artifacts import update_progress_artifact

from tasks import as_task
from tasks.api import TRANSIENT, retry_on
from tasks.state import RunState, ShardRecord

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchNotFinished(Exception):
    """The batch is still running; the task is retried after the next poll delay."""


def look_at_batch(client: OpenAI, state: RunState, record: ShardRecord,
                  progress_artifact: UUID | None = None) -> Batch:
    """The batch as it is now, journaled and logged; moves the run's progress artifact
    (Prefect UI) with the request counts."""
    batch = client.batches.retrieve(record.batch_id)
    counts = batch.request_counts
    state.update(record, batch_status=batch.status,
                 request_counts=counts.model_dump() if counts else None)
    if progress_artifact is not None:
        update_progress_artifact(progress_artifact, state.progress(record.attempt))
    done = f"{counts.completed + counts.failed:,}/{counts.total:,}" if counts else "?"
    get_run_logger().info("%s: batch %s is %s, %s requests done", record.name, batch.id,
                          batch.status, done)
    return batch


def poll_batch(client: OpenAI, state: RunState, record: ShardRecord,
               progress_artifact: UUID | None = None) -> Batch:
    """The batch once finished; raises BatchNotFinished before (so Prefect retries)."""
    batch = look_at_batch(client, state, record, progress_artifact)
    if batch.status not in TERMINAL:
        counts = batch.request_counts
        raise BatchNotFinished(f"batch {batch.id} is {batch.status} "
                               f"({counts.completed + counts.failed if counts else 0:,} done)")
    return batch


def any_batch_finished(client: OpenAI, state: RunState) -> bool:
    """Whether a suspended run has something to do: one of its running batches is done."""
    running = [r for r in state.shards if r.batch_id and r.status != "collected"]
    return any(client.batches.retrieve(r.batch_id).status in TERMINAL for r in running)


def poll_delays(minimum: float, maximum: float) -> list[float]:
    """Doubling delays from `minimum` to `maximum` (Prefect repeats the last one)."""
    delays = [minimum]
    while delays[-1] < maximum and len(delays) < 50:
        delays.append(min(delays[-1] * 2, maximum))
    return delays


def poll_retries(delays: list[float], max_wait_hours: float) -> int:
    """How many polls cover `max_wait_hours` with these delays."""
    budget = max_wait_hours * 3600 - sum(delays)
    return len(delays) + max(0, int(budget // delays[-1]) + 1)


wait_for_batch_task = as_task(poll_batch, "wait for batch",
                              retry_condition_fn=retry_on(BatchNotFinished, *TRANSIENT))
look_at_batch_task = as_task(look_at_batch, "look at batch", retries=3,
                             retry_delay_seconds=[2, 10, 30],
                             retry_condition_fn=retry_on(*TRANSIENT))
