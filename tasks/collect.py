"""Step 6, collect: one result per `custom_id` from a finished batch's files.

A result is an answer (checked against the job's schema) with its usage, or an error
classified as worth another attempt or not. A JSON answer that does not parse or does not
fit the schema is an error of its row, never of the job.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from jsonschema import Draft202012Validator
from openai import OpenAI
from openai.types import Batch

from enrichflow.config import ResponseFormat
from tasks import as_task
from tasks.api import TRANSIENT, retry_on

RESULTS = pa.schema([
    ("_custom_id", pa.string()), ("_batch_id", pa.string()), ("_ok", pa.bool_()),
    ("_error", pa.string()), ("_retryable", pa.bool_()), ("_answer", pa.string()),
    ("_finish_reason", pa.string()), ("_prompt_tokens", pa.int64()),
    ("_completion_tokens", pa.int64()),
])
ATTEMPT_RESULTS = RESULTS.append(pa.field("_attempt", pa.int64()))  # results of every attempt
RETRYABLE_STATUS = frozenset({408, 409, 429})
RETRYABLE_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout",
                             "token_limit_exceeded"})


def collect_results(client: OpenAI, batch: Batch, custom_ids: list[str],
                    response_format: ResponseFormat) -> pa.Table:
    """Results for exactly `custom_ids` (the shard's rows), whatever the batch returned."""
    if batch.status == "failed":
        first = (batch.errors.data or [None])[0] if batch.errors else None
        code = first.code if first else None
        message = f"batch {batch.id} failed validation: {code}: {first.message if first else ''}"
        return error_results(custom_ids, batch.id, message, code in RETRYABLE_CODES)
    results: dict[str, dict[str, Any]] = {}
    check = _answer_checker(response_format)
    for line in _lines(client, batch.output_file_id) + _lines(client, batch.error_file_id):
        results[line["custom_id"]] = _result(batch.id, line, check)
    rows = [results.get(cid) or _error(batch.id, f"batch {batch.id} returned no result for "
                                       "this row", True) for cid in custom_ids]
    columns = {name: [row.get(name) for row in rows] for name in RESULTS.names}
    columns["_custom_id"] = custom_ids
    return pa.table(columns, schema=RESULTS)


def error_results(custom_ids: list[str], batch_id: str | None, message: str,
                  retryable: bool) -> pa.Table:
    """The same error for every row of a shard (a refused batch, a cancel before sending)."""
    count = len(custom_ids)
    return pa.table({
        "_custom_id": custom_ids, "_batch_id": [batch_id] * count, "_ok": [False] * count,
        "_error": [message] * count, "_retryable": [retryable] * count,
        "_answer": pa.nulls(count), "_finish_reason": pa.nulls(count),
        "_prompt_tokens": pa.nulls(count), "_completion_tokens": pa.nulls(count),
    }, schema=RESULTS)


def _lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:  # a clean batch may report "" as well as null
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()
            if line.strip()]


def _error(batch_id: str, message: str, retryable: bool, **usage: Any) -> dict[str, Any]:
    return {"_batch_id": batch_id, "_ok": False, "_error": message, "_retryable": retryable,
            **usage}


def _result(batch_id: str, line: dict[str, Any], check) -> dict[str, Any]:
    response = line.get("response")
    if not response:
        error = line.get("error") or {}
        code = error.get("code")
        return _error(batch_id, f"{code}: {error.get('message')}", code in RETRYABLE_CODES)
    status, body = response.get("status_code"), response.get("body") or {}
    if status != 200:
        message = (body.get("error") or {}).get("message") or json.dumps(body)[:300]
        return _error(batch_id, f"HTTP {status}: {message}",
                      status in RETRYABLE_STATUS or status >= 500)
    usage = body.get("usage") or {}
    tokens = {"_prompt_tokens": usage.get("prompt_tokens"),
              "_completion_tokens": usage.get("completion_tokens")}
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    finish_reason = choice.get("finish_reason")
    content = message.get("content")
    if content is None:
        reason = message.get("refusal") or f"no content (finish_reason {finish_reason})"
        return _error(batch_id, f"the model gave no answer: {reason}", True, **tokens)
    answer, problem = check(content, finish_reason)
    if problem:
        return _error(batch_id, problem, True, **tokens)
    return {"_batch_id": batch_id, "_ok": True, "_retryable": False, "_answer": answer,
            "_finish_reason": finish_reason, **tokens}


def _answer_checker(response_format: ResponseFormat):
    """A function (content, finish_reason) -> (answer, problem) for this job's format."""
    if response_format.type == "text":
        return lambda content, _: (content, None)
    validator = Draft202012Validator(response_format.schema_) if response_format.schema_ else None

    def check(content: str, finish_reason: str | None) -> tuple[str | None, str | None]:
        try:
            parsed = json.loads(content)
        except ValueError:
            hint = " (cut at max_tokens: raise it)" if finish_reason == "length" else ""
            return None, f"the answer is not valid JSON{hint}: {content[:120]!r}"
        if validator is None:
            if not isinstance(parsed, dict):
                return None, "the answer is not a JSON object"
        else:
            error = next(iter(validator.iter_errors(parsed)), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                return None, f"the answer does not fit the schema at {where}: {error.message}"
        return json.dumps(parsed, ensure_ascii=False), None

    return check


collect_results_task = as_task(collect_results, "collect results", retries=3,
                               retry_delay_seconds=[2, 10, 30],
                               retry_condition_fn=retry_on(*TRANSIENT))
