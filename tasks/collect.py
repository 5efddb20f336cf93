"""Step 6, collect: one result per row of a shard from its finished batch's files.

A result is an answer (checked against the job's schema, as typed values) with its usage,
or an error classified as worth another attempt or not. A JSON answer that does not parse
or does not fit the schema is an error of its row, never of the job. The output and error
files are streamed to a temporary file and read by Arrow's JSON reader, column-wise; only
each answer's content is parsed in Python, once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json
from openai import OpenAI
from openai.types import Batch

from enrichflow.config import ResponseFormat
from tasks import as_task
from tasks.answers import answer_type, read_answers
from tasks.api import TRANSIENT, retry_on
from tasks.load import ROW

RESULT_FIELDS = [
    (ROW, pa.int64()), ("_custom_id", pa.string()), ("_batch_id", pa.string()),
    ("_ok", pa.bool_()), ("_error", pa.string()), ("_retryable", pa.bool_()),
    ("_answer", pa.string()), ("_finish_reason", pa.string()),
    ("_prompt_tokens", pa.int64()), ("_completion_tokens", pa.int64()),
]
VALUE = "_value"  # the answer as a struct of its output columns
# Arrow reads a result file in blocks of this size in parallel; a file with a longer line
# (a huge answer) is read line by line instead.
RESULT_BLOCK_BYTES = 16 * 1024 * 1024
RETRYABLE_STATUS = frozenset({408, 409, 429})
RETRYABLE_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout",
                             "token_limit_exceeded"})
# The part of a Batch API output or error line that a result needs.
_MESSAGE = pa.struct([("content", pa.string()), ("refusal", pa.string())])
_BODY = pa.struct([
    ("choices", pa.list_(pa.struct([("message", _MESSAGE), ("finish_reason", pa.string())]))),
    ("usage", pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])),
    ("error", pa.struct([("message", pa.string())])),
])
LINE = pa.schema([
    ("custom_id", pa.string()),
    ("response", pa.struct([("status_code", pa.int64()), ("body", _BODY)])),
    ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
])


def results_schema(response_format: ResponseFormat) -> pa.Schema:
    """The results of one shard: RESULT_FIELDS and the typed answer."""
    return pa.schema([*RESULT_FIELDS, (VALUE, answer_type(response_format))])


def collect_results(client: OpenAI, batch: Batch, rows: pa.Array, custom_ids: pa.Array,
                    response_format: ResponseFormat) -> pa.Table:
    """Results for exactly the shard's rows (`rows`, with their `custom_ids`), whatever
    the batch returned."""
    schema = results_schema(response_format)
    if batch.status == "failed":
        first = (batch.errors.data or [None])[0] if batch.errors else None
        code = first.code if first else None
        message = f"batch {batch.id} failed validation: {code}: {first.message if first else ''}"
        return error_results(rows, custom_ids, batch.id, message, code in RETRYABLE_CODES,
                             schema)
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:  # a clean batch may report "" as well as null
            with _downloaded(client, file_id) as path:
                lines.append(read_result_lines(path))
    return results_of_lines(pa.concat_tables(lines) if lines else LINE.empty_table(),
                            batch.id, rows, custom_ids, response_format)


def results_of_lines(lines: pa.Table, batch_id: str, rows: pa.Array, custom_ids: pa.Array,
                     response_format: ResponseFormat) -> pa.Table:
    """Results for exactly `rows` (with their `custom_ids`) from a batch's output and
    error lines (LINE)."""
    schema = results_schema(response_format)
    found = pc.index_in(custom_ids, value_set=lines["custom_id"])  # null: no line for it
    response = lines["response"]
    body = pc.struct_field(response, "body")
    usage = pc.struct_field(body, "usage")
    first = _first_choices(pc.struct_field(body, "choices"))
    content, finish_reason, status, prompt, completion = (column.take(found) for column in (
        pc.struct_field(pc.struct_field(first, "message"), "content"),
        pc.struct_field(first, "finish_reason"), pc.struct_field(response, "status_code"),
        pc.struct_field(usage, "prompt_tokens"), pc.struct_field(usage, "completion_tokens")))
    answered = pc.fill_null(pc.and_(pc.equal(status, 200), pc.is_valid(content)), False)

    values, problems = read_answers(content.filter(answered), finish_reason.filter(answered),
                                    response_format)
    errors: list[str | None] = [None] * len(custom_ids)
    retryable: list[bool] = [False] * len(custom_ids)
    answered_at = np.flatnonzero(answered.to_numpy(zero_copy_only=False))
    for i, problem in zip(answered_at, problems, strict=True):
        if problem is not None:
            errors[i], retryable[i] = problem, True
    failed = np.flatnonzero(pc.invert(answered).to_numpy(zero_copy_only=False))
    for i, line in zip(failed, lines.take(found.take(pa.array(failed, pa.int64()))).to_pylist(),
                       strict=True):
        errors[i], retryable[i] = _line_error(batch_id, line)
    ok = pa.array([e is None for e in errors])
    where = np.full(len(custom_ids), -1, dtype=np.int64)
    where[answered_at] = np.arange(len(answered_at))
    return pa.Table.from_arrays([
        rows.cast(pa.int64()), custom_ids.cast(pa.string()),
        pa.array([batch_id] * len(rows), pa.string()), ok, pa.array(errors, pa.string()),
        pa.array(retryable), pc.if_else(ok, content, pa.scalar(None, pa.string())),
        pc.if_else(ok, finish_reason, pa.scalar(None, pa.string())),
        prompt, completion, values.take(pa.array(where, mask=where < 0))], schema=schema)


def error_results(rows: pa.Array, custom_ids: pa.Array, batch_id: str | None, message: str,
                  retryable: bool, schema: pa.Schema) -> pa.Table:
    """The same error for every row of a shard (a refused batch)."""
    count = len(rows)
    columns = {ROW: rows.cast(pa.int64()), "_custom_id": custom_ids.cast(pa.string()),
               "_batch_id": pa.array([batch_id] * count, pa.string()),
               "_ok": pa.array([False] * count), "_error": pa.array([message] * count),
               "_retryable": pa.array([retryable] * count)}
    return pa.table({f.name: columns.get(f.name, pa.nulls(count, f.type)) for f in schema},
                    schema=schema)


def _line_error(batch_id: str, line: dict[str, Any] | None) -> tuple[str, bool]:
    """The error of a line without a usable answer (None: no line for the row)."""
    if line is None:
        return f"batch {batch_id} returned no result for this row", True
    response = line["response"]
    if not response:
        error = line["error"] or {}
        return f"{error.get('code')}: {error.get('message')}", \
            error.get("code") in RETRYABLE_CODES
    status, body = response["status_code"], response["body"] or {}
    if status != 200:
        message = (body.get("error") or {}).get("message") or "no error message"
        return f"HTTP {status}: {message}", status in RETRYABLE_STATUS or status >= 500
    choice = (body.get("choices") or [{}])[0] or {}
    message = choice.get("message") or {}
    reason = message.get("refusal") or f"no content (finish_reason {choice.get('finish_reason')})"
    return f"the model gave no answer: {reason}", True


def _first_choices(choices: pa.ChunkedArray) -> pa.Array:
    """Each line's first choice; null where it has none."""
    choices = choices.combine_chunks() if isinstance(choices, pa.ChunkedArray) else choices
    parents = pc.list_parent_indices(choices).to_numpy()
    flat = pc.list_flatten(choices)
    first = np.full(len(choices), -1, dtype=np.int64)
    positions, where = np.unique(parents, return_index=True)
    first[positions] = where
    return flat.take(pa.array(first, mask=first < 0))


def read_result_lines(path: str) -> pa.Table:
    """A local output or error file as LINE, column-wise (line by line if it must)."""
    try:
        return pyarrow.json.read_json(
            path, read_options=pyarrow.json.ReadOptions(block_size=RESULT_BLOCK_BYTES),
            parse_options=pyarrow.json.ParseOptions(
                explicit_schema=LINE, unexpected_field_behavior="ignore"))
    except pa.ArrowInvalid:  # a line of another shape, or longer than a block
        with open(path, "rb") as handle:
            return pa.Table.from_pylist([_shaped(orjson.loads(line)) for line in handle
                                         if line.strip()], schema=LINE)


@contextmanager
def _downloaded(client: OpenAI, file_id: str) -> Iterator[str]:
    """The file's content in a local temporary file, streamed, never whole in memory."""
    handle, path = tempfile.mkstemp(suffix=".jsonl")
    os.close(handle)
    try:
        with client.files.with_streaming_response.content(file_id) as response:
            response.stream_to_file(path)
        yield path
    finally:
        os.remove(path)


def _shaped(line: dict[str, Any]) -> dict[str, Any]:
    """A line as LINE, whatever the types of the fields a result does not need."""
    response = line.get("response") if isinstance(line.get("response"), dict) else None
    error = line.get("error") if isinstance(line.get("error"), dict) else None
    if response is not None:
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        body_error = body.get("error")
        choices = body.get("choices") if isinstance(body.get("choices"), list) else []
        response = {"status_code": response.get("status_code"), "body": {
            "choices": [_choice(c) for c in choices[:1] if isinstance(c, dict)],
            "usage": body.get("usage") if isinstance(body.get("usage"), dict) else None,
            "error": {"message": str(body_error.get("message") if isinstance(body_error, dict)
                                     else body_error)} if body_error else None}}
    return {"custom_id": line.get("custom_id"), "response": response,
            "error": {"code": error.get("code"), "message": str(error.get("message"))}
            if error else None}


def _choice(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content = message.get("content")
    return {"message": {"content": content if isinstance(content, str) else None,
                        "refusal": message.get("refusal")},
            "finish_reason": choice.get("finish_reason")}


collect_results_task = as_task(collect_results, "collect results", retries=3,
                               retry_delay_seconds=[2, 10, 30],
                               retry_condition_fn=retry_on(*TRANSIENT))
