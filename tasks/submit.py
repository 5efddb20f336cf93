"""Step 4, upload and create: put a shard's requests up and start its batch, exactly once.

The tasks here take and return plain values (names, ids, intents); the flow journals
around each of them, `uploading` before an upload and the upload's id after, `creating`
before a create and the batch id after, so a killed run re-attaches on the next start.

No provider's SDK sends an idempotency key, so a retried create could start a second,
paid batch. Creation therefore goes without SDK retries; after a failure we look for the
batch of this shard's intent (`BatchAPI.find`) before trying again. Once a shard's results
are collected and journaled, what its batch left at the provider can go.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from openai.types import Batch

from enrichflow.providers import BatchAPI, Intent
from enrichflow.tasks import as_task
from enrichflow.tasks.api import RETRIES

if TYPE_CHECKING:
    from enrichflow.tasks.state import RunState

CREATE_ATTEMPTS = 6


def find_batch(client: BatchAPI, intent: Intent) -> Batch | None:
    return client.find(intent)


def awaited_batches(client: BatchAPI, state: RunState) -> list[tuple[str, str]]:
    """(what, batch id) of the batches the run waits for: its shards' and, before it has
    any, its canary's, which only the provider's list knows of until it is collected."""
    awaited = [(record.name, record.batch_id) for record in state.awaited()]
    if not state.shards and client.tags_batches:  # only there can a canary be a batch
        canary = client.find(state.canary_intent())
        awaited += [("the canary", canary.id)] if canary else []
    return awaited


def upload_shard(client: BatchAPI, filename: str, payload: bytes,
                 orphans_since: float | None = None) -> str:
    """Upload a shard's JSONL as `filename`; its upload's id (see `BatchAPI.upload`)."""
    return client.upload(filename, payload, orphans_since)


def create_batch(client: BatchAPI, upload_id: str, endpoint: str, intent: Intent) -> Batch:
    """A new batch on `upload_id`, or the one an earlier, failed-looking try created."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return client.create(upload_id, endpoint, intent.metadata)
        except client.transient:
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(min(0.5 * 2**attempt, 8))
            found = client.find(intent)
            if found:
                return found
    raise AssertionError("unreachable")


def clean_up(client: BatchAPI, batch: Batch) -> None:
    """Delete what a collected batch leaves at the provider (its files, or itself)."""
    client.clean_up(batch)


upload_shard_task = as_task(upload_shard, "upload shard", **RETRIES)
create_batch_task = as_task(create_batch, "create batch", **RETRIES)
find_batch_task = as_task(find_batch, "find batch", **RETRIES)
clean_up_task = as_task(clean_up, "clean up batch", **RETRIES)
