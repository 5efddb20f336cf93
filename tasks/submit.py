"""Step 4, upload and create: put a shard's JSONL up and start its batch, exactly once.

The tasks here take and return plain values (names, ids, metadata); the flow journals
around each of them, `uploading` before an upload and the file id after, `creating`
before a create and the batch id after, so a killed run re-attaches on the next start.

The SDK sends no idempotency key, so a retried `POST /batches` could start a second,
paid batch. Creation therefore goes without SDK retries; after a failure we look for a
batch carrying this shard's metadata before trying again. An upload cut short by a kill
leaves a file nobody journaled: the next upload of that shard deletes it first. Once a
shard's results are collected and journaled, its files at the provider can go.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from openai import NotFoundError, OpenAI
from openai.types import Batch
from prefect import get_run_logger

from enrichflow.tasks import as_task
from enrichflow.tasks.api import TRANSIENT, retry_on

if TYPE_CHECKING:
    from enrichflow.tasks.state import RunState

CREATE_ATTEMPTS = 6
SLACK_SECONDS = 300  # clock differences between us and the provider


def find_batch(client: OpenAI, metadata: dict[str, str], since: float) -> Batch | None:
    """The newest batch tagged with `metadata`, looking back to `since` (newest first)."""
    for batch in client.batches.list(limit=100):
        if batch.created_at < since - SLACK_SECONDS:
            return None
        if batch.metadata and all(batch.metadata.get(k) == v for k, v in metadata.items()):
            return batch
    return None


def awaited_batches(client: OpenAI, state: RunState) -> list[tuple[str, str]]:
    """(what, batch id) of the batches the run waits for: its shards' and, before it has
    any, its canary's, which only the provider's list knows of until it is collected."""
    awaited = [(record.name, record.batch_id) for record in state.awaited()]
    if not state.shards:
        canary = find_batch(client, state.canary_metadata(), state.started_at)
        awaited += [("the canary", canary.id)] if canary else []
    return awaited


def upload_shard(client: OpenAI, filename: str, payload: bytes,
                 orphans_since: float | None = None) -> str:
    """Upload a shard's JSONL as `filename`; its file id. With `orphans_since`, files of
    that name uploaded since then (by a run killed before it journaled them) go first."""
    if orphans_since is not None:
        for old in client.files.list(purpose="batch", order="desc"):
            if old.created_at < orphans_since - SLACK_SECONDS:
                break  # newest first: the rest are older than the run
            if old.filename == filename:
                client.files.delete(old.id)
                get_run_logger().info("deleted %s, an upload of %s that was never journaled",
                                      old.id, filename)
    return client.files.create(file=(filename, payload), purpose="batch").id


def create_batch(client: OpenAI, file_id: str, endpoint: str, metadata: dict[str, str],
                 since: float) -> Batch:
    """A new batch on `file_id`, or the one an earlier, failed-looking try created."""
    no_retry = client.with_options(max_retries=0)
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return no_retry.batches.create(input_file_id=file_id, endpoint=endpoint,
                                           completion_window="24h", metadata=metadata)
        except TRANSIENT:
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(min(0.5 * 2**attempt, 8))
            found = find_batch(client, metadata, since)
            if found:
                return found
    raise AssertionError("unreachable")


def delete_files(client: OpenAI, file_ids: list[str | None]) -> None:
    """Delete the files (a collected batch's input, output and error files); one gone
    already is fine."""
    for file_id in filter(None, file_ids):
        try:
            client.files.delete(file_id)
        except NotFoundError:
            pass


_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30],
            "retry_condition_fn": retry_on(*TRANSIENT)}
upload_shard_task = as_task(upload_shard, "upload shard", **_RETRIES)
create_batch_task = as_task(create_batch, "create batch", **_RETRIES)
find_batch_task = as_task(find_batch, "find batch", **_RETRIES)
delete_files_task = as_task(delete_files, "delete files", **_RETRIES)
