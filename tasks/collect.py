"""Step 6, collect: one result per row of a shard from its finished batch's files.

A result is an answer (checked against the job's schema, as typed values) with its usage,
or an error classified as worth another attempt or not. A JSON answer that does not parse
or does not fit the schema is an error of its row, never of the job. The output and error
files are streamed to a temporary file and read by Arrow's JSON reader, column-wise; only
each answer's content is parsed in Python, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json
from openai.types import Batch

from enrichflow.config import (
    CHAT_ENDPOINT,
    EMBEDDINGS_ENDPOINT,
    RESPONSES_ENDPOINT,
    ProviderConfig,
    RequestConfig,
)
from enrichflow.provider import open_client
from enrichflow.providers import BatchAPI
from enrichflow.storage import Location
from enrichflow.tasks import as_task
from enrichflow.tasks.answers import answer_type, read_answers
from enrichflow.tasks.api import RETRIES
from enrichflow.tasks.load import ROW
from enrichflow.tasks.render import CUSTOM_ID
from enrichflow.tasks.state import ShardRecord, WrittenResults, write_results

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
# The part of a Batch API output or error line that a result needs, by endpoint.
_ERROR = pa.struct([("message", pa.string())])
_BODIES = {
    CHAT_ENDPOINT: pa.struct([
        ("choices", pa.list_(pa.struct([
            ("message", pa.struct([("content", pa.string()), ("refusal", pa.string())])),
            ("finish_reason", pa.string())]))),
        ("usage", pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])),
        ("error", _ERROR)]),
    RESPONSES_ENDPOINT: pa.struct([
        ("status", pa.string()),
        ("incomplete_details", pa.struct([("reason", pa.string())])),
        ("output", pa.list_(pa.struct([
            ("type", pa.string()),
            ("content", pa.list_(pa.struct([("type", pa.string()), ("text", pa.string()),
                                            ("refusal", pa.string())])))]))),
        ("usage", pa.struct([("input_tokens", pa.int64()), ("output_tokens", pa.int64())])),
        ("error", _ERROR)]),
    EMBEDDINGS_ENDPOINT: pa.struct([
        ("data", pa.list_(pa.struct([("embedding", pa.string())]))),
        ("usage", pa.struct([("prompt_tokens", pa.int64())])),
        ("error", _ERROR)]),
}
# A Responses answer cut short, as Chat Completions' finish_reason says it.
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def line_schema(endpoint: str) -> pa.Schema:
    return pa.schema([
        ("custom_id", pa.string()),
        ("response", pa.struct([("status_code", pa.int64()), ("body", _BODIES[endpoint])])),
        ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
    ])


@dataclass(frozen=True)
class CollectedShard:
    """What the journal records of a collected shard."""

    ok: int
    failed: int
    written: WrittenResults
    foreign: bool = False  # its batch held none of its requests: not ours to clean up


class ForeignBatchError(Exception):
    """A batch found for a shard after a crash holds none of the shard's requests."""


def collect_shard(provider: ProviderConfig, location: Location, batch: Batch,
                  record: ShardRecord, request: RequestConfig) -> CollectedShard:
    """Collect a finished shard's results (for the rows and custom ids its requests file
    names) and write them where its journal entry says: the work of a task that may run
    in another process, with its own client. The flow journals the shard collected once
    this returns. A batch that holds none of the shard's requests (on a provider without
    metadata, another client's batch was taken for it) gives every row a retryable error."""
    requests = location.read_parquet(record.requests_name)
    rows, custom_ids = (requests[c].combine_chunks() for c in (ROW, CUSTOM_ID))
    foreign = False
    with open_client(provider, location) as client:
        try:
            results = collect_results(client, batch, rows, custom_ids, request)
        except ForeignBatchError as exc:
            foreign = True
            results = error_results(rows, custom_ids, batch.id, str(exc), True,
                                    results_schema(request))
    ok = pc.sum(results["_ok"]).as_py() or 0
    return CollectedShard(ok, results.num_rows - ok, write_results(location, record, results),
                          foreign)


def results_schema(request: RequestConfig) -> pa.Schema:
    """The results of one shard: RESULT_FIELDS and the typed answer."""
    return pa.schema([*RESULT_FIELDS, (VALUE, answer_type(request))])


def collect_results(client: BatchAPI, batch: Batch, rows: pa.Array, custom_ids: pa.Array,
                    request: RequestConfig) -> pa.Table:
    """Results for exactly the shard's rows (`rows`, with their `custom_ids`), whatever
    the batch returned."""
    schema = results_schema(request)
    if batch.status == "failed":
        first = (batch.errors.data or [None])[0] if batch.errors else None
        code = first.code if first else None
        message = f"batch {batch.id} failed validation: {code}: {first.message if first else ''}"
        return error_results(rows, custom_ids, batch.id, message, code in RETRYABLE_CODES,
                             schema)
    with client.result_files(batch, custom_ids) as paths:
        lines = [read_result_lines(path, request.endpoint) for path in paths]
    lines = pa.concat_tables(lines) if lines else line_schema(request.endpoint).empty_table()
    if not client.tags_batches and lines.num_rows and \
            not pc.any(pc.is_in(lines["custom_id"], value_set=custom_ids)).as_py():
        raise ForeignBatchError(
            f"batch {batch.id} holds none of this shard's requests: another client's batch "
            "of the same size, created when this run was stopped, was taken for this "
            "shard's (its provider keeps no metadata); it is left alone, and these rows go "
            "round again")
    return results_of_lines(lines, batch.id, rows, custom_ids, request)


def results_of_lines(lines: pa.Table, batch_id: str, rows: pa.Array, custom_ids: pa.Array,
                     request: RequestConfig) -> pa.Table:
    """Results for exactly `rows` (with their `custom_ids`) from a batch's output and
    error lines (`line_schema`)."""
    schema = results_schema(request)
    found = pc.index_in(custom_ids, value_set=lines["custom_id"])  # null: no line for it
    response = lines["response"]
    status = pc.struct_field(response, "status_code").take(found)
    content, refusal, finish_reason, prompt, completion = (
        column.take(found) for column in _answer_fields(pc.struct_field(response, "body"),
                                                        request.endpoint))
    answered = pc.fill_null(pc.and_(pc.equal(status, 200), pc.is_valid(content)), False)

    values, problems = read_answers(content.filter(answered), finish_reason.filter(answered),
                                    request)
    errors: list[str | None] = [None] * len(custom_ids)
    retryable: list[bool] = [False] * len(custom_ids)
    answered_at = np.flatnonzero(answered.to_numpy(zero_copy_only=False))
    for i, problem in zip(answered_at, problems, strict=True):
        if problem is not None:
            errors[i], retryable[i] = problem, True
    failed = pa.array(np.flatnonzero(pc.invert(answered).to_numpy(zero_copy_only=False)),
                      pa.int64())
    at = found.take(failed)
    for i, has_line, line, refused, reason in zip(
            failed.to_pylist(), at.is_valid().to_pylist(), lines.take(at).to_pylist(),
            refusal.take(failed).to_pylist(), finish_reason.take(failed).to_pylist(),
            strict=True):
        errors[i], retryable[i] = _line_error(batch_id, line if has_line else None, refused,
                                              reason)
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


def _answer_fields(body: pa.ChunkedArray, endpoint: str) -> list[pa.Array]:
    """Per line: the answer's text (an embedding's base64), the refusal, the finish
    reason (in Chat Completions' words), the prompt and the completion tokens."""
    usage = pc.struct_field(body, "usage")
    if endpoint == EMBEDDINGS_ENDPOINT:
        embedding = pc.struct_field(_first(pc.struct_field(body, "data")), "embedding")
        none = pa.nulls(len(body), pa.string())
        return [embedding, none, none, pc.struct_field(usage, "prompt_tokens"),
                pa.array(np.zeros(len(body), dtype=np.int64))]
    if endpoint == RESPONSES_ENDPOINT:
        output = pc.struct_field(body, "output")
        parts = pc.struct_field(_first(output, of_type="message"), "content")
        refusal = pc.struct_field(_first(parts, of_type="refusal"), "refusal")
        reason = pc.struct_field(pc.struct_field(body, "incomplete_details"), "reason")
        finish = pc.if_else(pc.equal(pc.struct_field(body, "status"), "incomplete"),
                            pc.coalesce(_renamed(reason, _INCOMPLETE), "incomplete"), "stop")
        return [_output_text(output), refusal, finish, pc.struct_field(usage, "input_tokens"),
                pc.struct_field(usage, "output_tokens")]
    choice = _first(pc.struct_field(body, "choices"))
    message = pc.struct_field(choice, "message")
    return [pc.struct_field(message, "content"), pc.struct_field(message, "refusal"),
            pc.struct_field(choice, "finish_reason"), pc.struct_field(usage, "prompt_tokens"),
            pc.struct_field(usage, "completion_tokens")]


def _renamed(values: pa.Array, names: dict[str, str]) -> pa.Array:
    """`values` with those in `names` replaced by their new name."""
    for old, new in names.items():
        values = pc.if_else(pc.equal(values, old), new, values)
    return values


def _line_error(batch_id: str, line: dict[str, Any] | None, refusal: str | None,
                finish_reason: str | None) -> tuple[str, bool]:
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
    reason = refusal or f"no content (finish_reason {finish_reason})"
    return f"the model gave no answer: {reason}", True


def _items(lists: pa.Array | pa.ChunkedArray, of_type: str | None = None
           ) -> tuple[np.ndarray, pa.Array]:
    """The lists' items (those whose `type` is `of_type`, if given), in order, and the
    index of the list each is from."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    parents = pc.list_parent_indices(lists).to_numpy()
    items = pc.list_flatten(lists)
    if of_type is None:
        return parents, items
    kept = pc.fill_null(pc.equal(pc.struct_field(items, "type"), of_type), False)
    return parents[kept.to_numpy(zero_copy_only=False)], items.filter(kept)


def _first(lists: pa.Array | pa.ChunkedArray, of_type: str | None = None) -> pa.Array:
    """Each list's first item (of those whose `type` is `of_type`, if given); null where
    it has none."""
    parents, items = _items(lists, of_type)
    return items.take(_at(len(lists), *np.unique(parents, return_index=True)))


def _output_text(output: pa.ChunkedArray) -> pa.Array:
    """Each Responses output's text: its messages' `output_text` parts, joined as the
    SDK's `Response.output_text` joins them; null where it has none."""
    lines, messages = _items(output, of_type="message")
    of_message, parts = _items(pc.struct_field(messages, "content"), of_type="output_text")
    texts = pa.table({"line": lines[of_message], "text": pc.struct_field(parts, "text")})
    joined = texts.group_by("line", use_threads=False).aggregate([("text", "list")])
    return pc.binary_join(joined["text_list"], "").combine_chunks().take(
        _at(len(output), joined["line"].to_numpy(), np.arange(joined.num_rows)))


def _at(count: int, positions: np.ndarray, items: np.ndarray) -> pa.Array:
    """Indices of `count` values: item `items[i]` at `positions[i]`, null elsewhere."""
    at = np.full(count, -1, dtype=np.int64)
    at[positions] = items
    return pa.array(at, mask=at < 0)


def read_result_lines(path: str, endpoint: str = CHAT_ENDPOINT) -> pa.Table:
    """A local output or error file as `line_schema`, column-wise (line by line if it
    must)."""
    schema = line_schema(endpoint)
    try:
        return pyarrow.json.read_json(
            path, read_options=pyarrow.json.ReadOptions(block_size=RESULT_BLOCK_BYTES),
            parse_options=pyarrow.json.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"))
    except pa.ArrowInvalid:  # a line of another shape, or longer than a block
        with open(path, "rb") as handle:
            return pa.Table.from_pylist([_shaped(orjson.loads(line), pa.struct(list(schema)))
                                         for line in handle if line.strip()], schema=schema)


def _shaped(value: Any, kind: pa.DataType) -> Any:
    """`value` with what does not have the type `kind` gives it made null (an error given
    as bare text becomes its message), so that Arrow takes any line."""
    if pa.types.is_struct(kind):
        if not isinstance(value, dict):
            return {"message": value} if isinstance(value, str) and \
                kind.get_field_index("message") >= 0 else None
        return {f.name: _shaped(value.get(f.name), f.type) for f in kind}
    if pa.types.is_list(kind):
        return [_shaped(v, kind.value_type) for v in value] if isinstance(value, list) else None
    if pa.types.is_string(kind):
        return value if isinstance(value, str) else None
    if pa.types.is_integer(kind):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


collect_shard_task = as_task(collect_shard, "collect shard", **RETRIES)
