"""Step 4, upload and create: put a shard's JSONL up and start its batch, exactly once.

The SDK sends no idempotency key, so a retried `POST /batches` could start a second,
paid batch. Creation therefore goes without SDK retries; after a failure we look for a
batch carrying this shard's metadata before trying again. The journal is written around
each call, so a killed run re-attaches on the next start.
"""

from __future__ import annotations

import time

from openai import OpenAI
from openai.types import Batch
from prefect import get_run_logger

from tasks import as_task
from tasks.api import TRANSIENT, retry_on
from tasks.state import RunState, ShardRecord

CREATE_ATTEMPTS = 6


def batch_metadata(state: RunState, record: ShardRecord) -> dict[str, str]:
    return {"enrichflow_job": state.job_key, "enrichflow_run": state.run_id,
            "attempt": str(record.attempt), "shard": str(record.shard),
            "submission": str(record.submission)}


def find_batch(client: OpenAI, metadata: dict[str, str], since: float) -> Batch | None:
    """The newest batch tagged with `metadata`, looking back to `since` (newest first)."""
    for batch in client.batches.list(limit=100):
        if batch.created_at < since - 300:
            return None
        if batch.metadata and all(batch.metadata.get(k) == v for k, v in metadata.items()):
            return batch
    return None


def submit_shard(client: OpenAI, state: RunState, record: ShardRecord, payload: bytes,
                 endpoint: str) -> str:
    """The batch id of this shard: the recorded one, a tagged one found, or a new one."""
    log = get_run_logger()
    if record.batch_id:
        log.info("%s: re-attaching to batch %s", record.name, record.batch_id)
        return record.batch_id
    metadata = batch_metadata(state, record)
    if record.status == "creating":
        found = find_batch(client, metadata, state.started_at)
        if found:
            log.info("%s: found batch %s created before a crash", record.name, found.id)
            state.update(record, batch_id=found.id, status="submitted")
            return found.id
    if not record.file_id:
        state.update(record, status="uploading")
        name = f"{metadata['enrichflow_job'][:12]}-a{record.attempt}-s{record.shard}.jsonl"
        uploaded = client.files.create(file=(name, payload), purpose="batch")
        state.update(record, file_id=uploaded.id, status="uploaded")
        log.info("%s: uploaded %s rows (%s bytes) as %s", record.name, f"{record.rows:,}",
                 f"{record.bytes:,}", uploaded.id)
    state.update(record, status="creating")
    batch = _create_once(client, record.file_id, endpoint, metadata, state.started_at)
    state.update(record, batch_id=batch.id, status="submitted", batch_status=batch.status)
    log.info("%s: created batch %s", record.name, batch.id)
    return batch.id


def _create_once(client: OpenAI, file_id: str, endpoint: str, metadata: dict[str, str],
                 since: float) -> Batch:
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


submit_shard_task = as_task(submit_shard, "upload and create batch", retries=3,
                            retry_delay_seconds=[2, 10, 30],
                            retry_condition_fn=retry_on(*TRANSIENT))
