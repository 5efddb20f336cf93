"""Step 3, render: one Batch API JSONL line per row, built column-wise in Arrow.

The request body is the same for every row except the user message and the `custom_id`,
so the line is rendered once as a JSON skeleton and each row's text is JSON-escaped and
spliced in with Arrow string kernels: no per-row Python dicts or `json.dumps`. Only
images, which must be read from files anyway, are prepared row by row (`enrichflow.tasks.images`).
"""

from __future__ import annotations

import difflib
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import RequestConfig, TextPart
from enrichflow.errors import InputError
from enrichflow.tasks.images import image_parts_json
from enrichflow.tasks.load import KEY, ROW

CUSTOM_ID = "_custom_id"
LINE = "_line"  # the request's JSONL line, newline included
USER_TEXT = "_user_text"  # the user message as the model reads it (text templates only)
_USER_SLOT = "@@enrichflow:user@@"
_ID_SLOT = "@@enrichflow:custom_id@@"
_SIMPLE_ESCAPES = [("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
                   ("\b", "\\b"), ("\f", "\\f")]
_OTHER_CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\n\r\t\b\f"]


@dataclass(frozen=True)
class Rendered:
    requests: pa.Table  # `_row`, `_key`, `_custom_id`, `_line` (and `_user_text`) of the
    # rows to send
    unsent: pa.Table  # `_row`, `_key`, `_status` (skipped or failed), `_error` of the rows
    # not sent


def custom_ids(keys: pa.Array | pa.ChunkedArray, job_tag: str) -> pa.Array:
    """`custom_id` of each row: the job's tag and the row key, so answers map back."""
    return pc.binary_join_element_wise(pa.scalar(job_tag), keys, "-")


def render_requests(table: pa.Table, request: RequestConfig, job_tag: str,
                    dataset_name: str = "the dataset",
                    storage_options: dict[str, Any] | None = None) -> Rendered:
    """Rows with an empty text column are skipped; rows with an unusable image fail."""
    missing = [c for c in request.columns() if c not in table.column_names]
    if missing:
        available = [c for c in table.column_names if c not in (KEY, ROW)]
        close = difflib.get_close_matches(missing[0], available, n=1)
        raise InputError(f"request.user uses column(s) {', '.join(missing)} that "
                         f"{dataset_name} does not have"
                         + (f" (did you mean {close[0]}?)" if close else "")
                         + f"; its columns are: {', '.join(available)}")
    texts = {c: _as_text(table[c], c, dataset_name) for c in request.text_columns()}
    no_reason = pa.nulls(table.num_rows, pa.string())
    skip_reason = no_reason
    for column, text in texts.items():
        skip_reason = pc.if_else(pc.and_(pc.is_null(text), pc.is_null(skip_reason)),
                                 pa.scalar(f"skipped: column {column!r} is empty"), skip_reason)

    fail_reason = no_reason
    columns = {}
    if not isinstance(request.user, list):  # one template: the user message or the input
        template = request.text_parts()[0]
        content = ['"', *_template_pieces(template, texts), '"']
        columns[USER_TEXT] = _join(_template_pieces(template, texts, escape=False))
    else:
        content = ["["]
        keys = table[KEY].to_pylist()
        text_part = '{"type":"input_text","text":"' if request.responses else \
            '{"type":"text","text":"'
        for i, part in enumerate(request.user):
            content += [","] if i else []
            if isinstance(part, TextPart):
                content += [text_part, *_template_pieces(part.text, texts), '"}']
                continue
            images, errors = image_parts_json(table[part.column], part.column, keys,
                                              part.detail, request.image_max_side,
                                              storage_options, request.responses)
            fail_reason = pc.coalesce(fail_reason, errors)
            content.append(images)
        content.append("]")

    ids = custom_ids(table[KEY], job_tag)
    before_user, after_user = _skeleton(request).split('"' + _USER_SLOT + '"')
    before_id, after_id = before_user.split('"' + _ID_SLOT + '"')
    lines = _join([before_id, '"', escape_json(ids), '"', after_id, *content, after_user + "\n"])

    skipped = pc.is_valid(skip_reason)
    failed = pc.and_(pc.invert(skipped), pc.is_valid(fail_reason))
    unsent = pc.or_(skipped, failed)
    requests = pa.table({ROW: table[ROW], KEY: table[KEY], CUSTOM_ID: ids, LINE: lines,
                         **columns})
    if pc.any(unsent).as_py():  # filtering copies every line: only when some are left out
        requests = requests.filter(pc.invert(unsent))
    status = pc.if_else(skipped, "skipped", "failed")
    reason = pc.if_else(skipped, skip_reason, fail_reason)
    return Rendered(requests=requests, unsent=pa.table(
        {ROW: table[ROW], KEY: table[KEY], "_status": status, "_error": reason}).filter(unsent))


def _template_pieces(template: str, texts: dict[str, pa.ChunkedArray],
                     escape: bool = True) -> list:
    """A template as (JSON-escaped) literals and columns, for string concatenation."""
    pieces: list = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append(_escape_literal(literal) if escape else literal)
        if field is not None:
            pieces.append(escape_json(texts[field]) if escape else texts[field])
    return pieces


def _join(pieces: list) -> pa.ChunkedArray:
    """Literals and columns concatenated row by row; null where a column is null."""
    return pc.binary_join_element_wise(
        *[pa.scalar(p) if isinstance(p, str) else p for p in pieces], "")


def _skeleton(request: RequestConfig) -> str:
    """The request line with slots for the `custom_id` and the user content."""
    body = request.body_parameters()
    if request.embeddings:
        body["input"] = _USER_SLOT
    elif request.responses:
        if request.system:
            body["instructions"] = request.system
        body["input"] = [{"role": "user", "content": _USER_SLOT}]
    else:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        body["messages"] = [*messages, {"role": "user", "content": _USER_SLOT}]
    line = {"custom_id": _ID_SLOT, "method": "POST", "url": request.endpoint, "body": body}
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
    """JSON string escaping of a string column, without the surrounding quotes. Each
    replacement copies the column, so only those whose character occurs are made."""
    if not pc.any(pc.match_substring_regex(text, '[\\\\"\\x00-\\x1f]')).as_py():
        return text
    for raw, escaped in _SIMPLE_ESCAPES:
        if pc.any(pc.match_substring(text, raw)).as_py():
            text = pc.replace_substring(text, raw, escaped)
    if pc.any(pc.match_substring_regex(text, "[\\x00-\\x1f]")).as_py():
        for control in _OTHER_CONTROLS:
            text = pc.replace_substring(text, control, f"\\u{ord(control):04x}")
    return text


def string_data(strings: pa.Array | pa.ChunkedArray) -> bytes:
    """The strings one after another, as they lie in Arrow's buffers (no copy per value)."""
    pieces = []
    for data, bounds in string_buffers(strings):
        if len(bounds) > 1:
            pieces.append(data[bounds[0]:bounds[-1]].tobytes())
    return b"".join(pieces)


def string_buffers(strings: pa.Array | pa.ChunkedArray) -> Iterator[tuple[memoryview, list[int]]]:
    """Each chunk's UTF-8 data, and where its values start and end in it (value i is
    data[bounds[i]:bounds[i + 1]])."""
    for chunk in strings.chunks if isinstance(strings, pa.ChunkedArray) else [strings]:
        _, offsets, data = chunk.buffers()
        kind = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        bounds = np.frombuffer(offsets, dtype=kind)[chunk.offset:chunk.offset + len(chunk) + 1]
        yield memoryview(data) if data is not None else memoryview(b""), bounds.tolist()


def _escape_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]
