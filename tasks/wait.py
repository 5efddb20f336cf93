"""Step 5, wait: look at a batch once; raise while it is not finished, so Prefect retries.

The waiting itself is the task's retry policy (delays from the job's poll bounds), which
makes every poll visible in the Prefect UI and survives worker restarts.
"""

from __future__ import annotations

from openai import OpenAI
from openai.types import Batch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.api import TRANSIENT, retry_on
from tasks.state import RunState, ShardRecord

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchNotFinished(Exception):
    """The batch is still running; the task is retried after the next poll delay."""


def poll_batch(client: OpenAI, state: RunState, record: ShardRecord) -> Batch:
    batch = client.batches.retrieve(record.batch_id)
    counts = batch.request_counts
    state.update(record, batch_status=batch.status,
                 request_counts=counts.model_dump() if counts else None)
    done = f"{counts.completed + counts.failed:,}/{counts.total:,}" if counts else "?"
    get_run_logger().info("%s: batch %s is %s, %s requests done", record.name, batch.id,
                          batch.status, done)
    if batch.status not in TERMINAL:
        raise BatchNotFinished(f"batch {batch.id} is {batch.status} ({done} done)")
    return batch


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


wait_for_batch_task = task(poll_batch, name="wait for batch", cache_policy=NONE,
                           retry_condition_fn=retry_on(BatchNotFinished, *TRANSIENT))
