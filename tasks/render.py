"""Step 3, render: one Batch API JSONL line per row, built column-wise in Arrow.

The request body is the same for every row except the user message and the `custom_id`,
so the line is rendered once as a JSON skeleton and each row's text is JSON-escaped and
spliced in with Arrow string kernels: no per-row Python dicts or `json.dumps`.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NONE

from enrichflow.config import RequestConfig
from enrichflow.errors import InputError
from tasks.load import KEY

CUSTOM_ID = "_custom_id"
LINE = "_line"
_USER_SLOT = "@@enrichflow:user@@"
_ID_SLOT = "@@enrichflow:custom_id@@"
_SIMPLE_ESCAPES = [("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
                   ("\b", "\\b"), ("\f", "\\f")]
_OTHER_CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\n\r\t\b\f"]


@dataclass(frozen=True)
class Rendered:
    requests: pa.Table  # `_key`, `_custom_id`, `_line` of the rows to send
    skipped: pa.Table  # `_key`, `_error` of the rows not sent (an empty template column)


def custom_ids(keys: pa.Array | pa.ChunkedArray, job_tag: str) -> pa.Array:
    """`custom_id` of each row: the job's tag and the row key, so answers map back."""
    return pc.binary_join_element_wise(pa.scalar(job_tag), keys, "-")


def render_requests(table: pa.Table, request: RequestConfig, job_tag: str,
                    dataset_name: str = "the dataset") -> Rendered:
    columns = request.columns()
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        available = ", ".join(c for c in table.column_names if c != KEY)
        raise InputError(f"request.user uses column(s) {', '.join(missing)} that "
                         f"{dataset_name} does not have; its columns are: {available}")
    texts = {c: _as_text(table[c], c, dataset_name) for c in columns}

    empty = pa.array([False] * table.num_rows)
    reasons = pa.nulls(table.num_rows, pa.string())
    for column in columns:
        is_empty = pc.is_null(texts[column])
        reasons = pc.if_else(pc.and_(is_empty, pc.is_null(reasons)),
                             pa.scalar(f"skipped: column {column!r} is empty"), reasons)
        empty = pc.or_(empty, is_empty)

    user_pieces: list = []
    for literal, field, _, _ in string.Formatter().parse(request.user):
        if literal:
            user_pieces.append(pa.scalar(_escape_literal(literal)))
        if field is not None:
            user_pieces.append(escape_json(texts[field]))

    ids = custom_ids(table[KEY], job_tag)
    pieces: list = []
    for part in _skeleton(request).split('"' + _ID_SLOT + '"'):
        for i, chunk in enumerate(part.split('"' + _USER_SLOT + '"')):
            if i:
                pieces += [pa.scalar('"'), *user_pieces, pa.scalar('"')]
            pieces.append(pa.scalar(chunk))
        pieces += [pa.scalar('"'), escape_json(ids), pa.scalar('"')]
    pieces = pieces[:-3]  # the id slot occurs once: drop the splice added after the last part
    lines = pc.binary_join_element_wise(*pieces, "")

    keep = pc.invert(empty)
    requests = pa.table({KEY: table[KEY], CUSTOM_ID: ids, LINE: lines}).filter(keep)
    skipped = pa.table({KEY: table[KEY], "_error": reasons}).filter(empty)
    return Rendered(requests=requests, skipped=skipped)


def _skeleton(request: RequestConfig) -> str:
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": _USER_SLOT})
    line = {"custom_id": _ID_SLOT, "method": "POST", "url": request.endpoint,
            "body": {**request.body_parameters(), "messages": messages}}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def _as_text(column: pa.ChunkedArray, name: str, dataset_name: str) -> pa.ChunkedArray:
    """The column as strings; null where the value is missing or blank."""
    try:
        text = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"column {name!r} of {dataset_name} holds {column.type}, which a "
                         "message template cannot show; use a text or number column") from exc
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
    return pc.if_else(blank, pa.scalar(None, pa.string()), text)


def escape_json(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """JSON string escaping of a string column, without the surrounding quotes."""
    for raw, escaped in _SIMPLE_ESCAPES:
        text = pc.replace_substring(text, raw, escaped)
    if pc.any(pc.match_substring_regex(text, "[\\x00-\\x1f]")).as_py():
        for control in _OTHER_CONTROLS:
            text = pc.replace_substring(text, control, f"\\u{ord(control):04x}")
    return text


def _escape_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


render_requests_task = task(render_requests, name="render requests", cache_policy=NONE)
