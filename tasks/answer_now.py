"""Requests answered through the synchronous API, as a batch would have answered them:
the canary's sample, and the rows that a deadline takes out of their batches."""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from enrichflow.config import RequestConfig
from enrichflow.providers import BatchAPI
from enrichflow.tasks.collect import read_result_lines, results_of_lines
from enrichflow.tasks.load import ROW
from enrichflow.tasks.render import CUSTOM_ID, LINE

SYNC_AT_ONCE = 8  # requests in flight at once: well within a tier's rate limits


def answer_now(client: BatchAPI, requests: pa.Table, request: RequestConfig, batch_id: str,
               service_tier: str | None = None) -> pa.Table:
    """Each request through the synchronous API (at `service_tier`, if given), its answer
    read as a Batch API output line of a batch named `batch_id`."""

    def answer(custom_id: str, line: str) -> dict:
        body = json.loads(line)["body"]
        if service_tier:
            body["service_tier"] = service_tier
        status, answer = client.answer_now(request.endpoint, body)
        return {"custom_id": custom_id, "response": {"status_code": status, "body": answer}}

    with ThreadPoolExecutor(SYNC_AT_ONCE) as pool:
        lines = list(pool.map(answer, requests[CUSTOM_ID].to_pylist(),
                              requests[LINE].to_pylist()))
    handle, scratch = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(handle, "w") as out:
            out.writelines(json.dumps(line) + "\n" for line in lines)
        read = read_result_lines(scratch, request.endpoint)
    finally:
        os.remove(scratch)
    return results_of_lines(read, batch_id, requests[ROW].combine_chunks(),
                            requests[CUSTOM_ID].combine_chunks(), request)
