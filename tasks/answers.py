"""What an answer is: its Arrow columns, its check against the job's schema, its values.

The answers of a batch are parsed once, column-wise: Arrow's JSON reader, given the
answer's Arrow schema, reads them all into typed columns and refuses any answer whose
types or fields do not fit (the JSON Schema most jobs use: objects closed by
`additionalProperties: false`, typed fields, arrays, nested objects), and what Arrow
cannot tell (a missing or null field, an enum) is checked on the columns. Only the
answers that this cannot decide are parsed one by one and checked by `jsonschema`,
which also words every error. A list of categories becomes a list column, an object a
struct. An embedding (base64, as requested) becomes a fixed-size list of float32.
"""

from __future__ import annotations

import binascii
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json
from jsonschema import Draft202012Validator

from enrichflow.config import RequestConfig
from enrichflow.errors import InputError
from enrichflow.tasks.load import BLOCK_BYTES
from enrichflow.tasks.render import string_buffers, string_data

TEXT_COLUMN = "response"
EMBEDDING_COLUMN = "embedding"
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
            "boolean": pa.bool_()}
_COLUMN_WISE = {"type", "properties", "required", "additionalProperties", "items", "enum",
                "description", "title"}


def answer_columns(request: RequestConfig) -> dict[str, tuple[pa.DataType, dict]]:
    """Output column name -> (Arrow type, JSON schema) for the job's answers."""
    if request.embeddings:
        return {EMBEDDING_COLUMN: (pa.list_(pa.float32(), request.vector_size),
                                   {"type": "array", "items": {"type": "number"}})}
    response_format = request.response_format
    schema = response_format.schema_
    if response_format.type != "json_schema" or not schema:
        return {TEXT_COLUMN: (pa.string(), {"type": "string"})}
    return {name: (_arrow_type(node, schema), node)
            for name, node in schema["properties"].items()}


def answer_type(request: RequestConfig) -> pa.StructType:
    """One answer as a struct of its output columns."""
    return pa.struct([(name, kind) for name, (kind, _) in answer_columns(request).items()])


def check_answer_columns(table: pa.Table, request: RequestConfig) -> None:
    clash = [c for c in answer_columns(request) if c in table.column_names]
    if clash:
        raise InputError(f"the answer field(s) {', '.join(clash)} have the name of input "
                         "column(s); rename the schema properties or the columns")


def answer_reader(request: RequestConfig
                  ) -> Callable[[str, str | None], tuple[Any, str | None]]:
    """A function (content, finish_reason) -> (answer value, problem) for the job's
    text or JSON answers; the value is a dict of the answer's columns."""
    response_format = request.response_format
    if response_format.type == "text":
        return lambda content, _: ({TEXT_COLUMN: content}, None)
    schema = response_format.schema_
    validator = Draft202012Validator(schema) if schema else None

    def read(content: str, finish_reason: str | None) -> tuple[Any, str | None]:
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            hint = " (cut at max_tokens: raise it)" if finish_reason == "length" else ""
            return None, f"the answer is not valid JSON{hint}: {content[:120]!r}"
        if validator is None:  # json_object: the answer is kept as JSON text
            return ({TEXT_COLUMN: content}, None) if isinstance(parsed, dict) else \
                (None, "the answer is not a JSON object")
        error = next(iter(validator.iter_errors(parsed)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return None, f"the answer does not fit the schema at {where}: {error.message}"
        return parsed, None

    return read


def read_answers(contents: pa.Array, finish_reasons: pa.Array, request: RequestConfig
                 ) -> tuple[pa.StructArray, list[str | None]]:
    """Each answer's typed value (null where it has a problem) and its problem, if any;
    column-wise where the schema allows, one by one where it must."""
    kind = answer_type(request)
    if request.embeddings:
        return _vectors(contents, kind)
    response_format = request.response_format
    count = len(contents)
    decided = np.zeros(count, dtype=bool)
    values = pa.nulls(count, kind)
    schema = response_format.schema_
    column_wise = response_format.type == "json_schema" and bool(schema) and _column_wise(schema)
    one_line = pc.invert(pc.fill_null(pc.match_substring(contents, "\n"), True))
    candidates = np.flatnonzero(one_line.to_numpy(zero_copy_only=False)) if column_wise else []
    if len(candidates):
        texts = contents.take(pa.array(candidates, pa.int64()))
        try:
            table = pyarrow.json.read_json(
                io.BytesIO(string_data(pc.binary_join_element_wise(texts, "\n", ""))),
                read_options=pyarrow.json.ReadOptions(block_size=BLOCK_BYTES),
                parse_options=pyarrow.json.ParseOptions(explicit_schema=pa.schema(list(kind)),
                                                        unexpected_field_behavior="error"))
        except pa.ArrowInvalid:
            table = None
        if table is not None and table.num_rows == len(candidates):
            parsed = pa.StructArray.from_arrays([c.combine_chunks() for c in table.columns],
                                                fields=list(kind))
            nulls_doubt = pc.match_substring(texts, "null").to_numpy(zero_copy_only=False)
            sure = ~_doubtful(parsed, schema, nulls_doubt)
            decided[candidates[sure]] = True
            where = np.full(count, -1, dtype=np.int64)
            where[candidates[sure]] = np.flatnonzero(sure)
            values = parsed.take(pa.array(where, mask=where < 0))
    problems: list[str | None] = [None] * count
    rest = np.flatnonzero(~decided)
    if len(rest):
        read = answer_reader(request)
        taken = pa.array(rest, pa.int64())
        one_by_one = [read(text, reason) for text, reason in zip(
            contents.take(taken).to_pylist(), finish_reasons.take(taken).to_pylist(),
            strict=True)]
        for i, (_, problem) in zip(rest, one_by_one, strict=True):
            problems[i] = problem
        others = typed_answers([value for value, _ in one_by_one], kind)
        at = np.arange(count)
        at[rest] = count + np.arange(len(rest))
        values = pa.concat_arrays([values, others]).take(pa.array(at, pa.int64()))
    return values, problems


def _vectors(contents: pa.Array, kind: pa.StructType) -> tuple[pa.StructArray, list[str | None]]:
    """Base64 embeddings as the struct of one fixed-size float32 list; an embedding that
    does not decode to that many numbers is a problem of its row."""
    size = kind[0].type.list_size
    data = np.zeros((len(contents), 4 * size), dtype=np.uint8)
    problems: list[str | None] = []
    row = 0
    for buffer, bounds in string_buffers(contents.cast(pa.string())):
        for begin, end in zip(bounds, bounds[1:], strict=False):
            try:  # from Arrow's buffer: no Python string per embedding
                raw = binascii.a2b_base64(buffer[begin:end], strict_mode=True)
            except (binascii.Error, ValueError):
                raw = None
            if raw is not None and len(raw) == 4 * size:
                data[row] = np.frombuffer(raw, dtype=np.uint8)
                problems.append(None)
            else:
                problems.append(f"the embedding has {len(raw) / 4:g} numbers, not {size}"
                                if raw is not None else "the embedding is not base64")
            row += 1
    bad = pa.array([p is not None for p in problems], pa.bool_())
    vectors = pa.FixedSizeListArray.from_arrays(
        pa.array(data.reshape(-1).view("<f4")), size)
    return pa.StructArray.from_arrays([vectors], fields=list(kind), mask=bad), problems


def _column_wise(schema: dict) -> bool:
    """Whether every object of the schema is closed and every node is in the subset
    that Arrow's reader and `_doubtful` decide."""
    def fits(node: Any) -> bool:
        if not isinstance(node, dict) or set(node) - _COLUMN_WISE:
            return False
        kind = node.get("type")
        if kind == "object":
            return node.get("additionalProperties") is False and bool(node.get("properties")) \
                and all(fits(sub) for sub in node["properties"].values())
        if kind == "array":
            return fits(node.get("items"))
        if isinstance(kind, str) and kind in _SCALARS:
            return "enum" not in node or all(isinstance(v, str) for v in node["enum"])
        return False
    return fits(schema)


def _doubtful(array: pa.Array, node: dict, nulls_doubt: np.ndarray) -> np.ndarray:
    """Per value of `array` (read by Arrow as the schema's types): whether the columns
    cannot vouch for it, at any depth: a required field that is null (missing, or null:
    jsonschema tells), an optional one that is null where the answer's text holds a
    `null` (`nulls_doubt`: it may be an explicit null, not a missing field), a null item
    of an array, or a value outside its enum."""
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    doubt = np.zeros(len(array), dtype=bool)
    if node.get("type") == "object":
        required = set(node.get("required", []))
        for name, sub in node["properties"].items():
            child = pc.struct_field(array, name)
            null = child.is_null().to_numpy(zero_copy_only=False)
            doubt |= valid & null & (nulls_doubt if name not in required else True)
            doubt |= valid & _doubtful(child, sub, nulls_doubt)
    elif node.get("type") == "array":
        values = pc.list_flatten(array)
        if len(values):
            parents = pc.list_parent_indices(array).to_numpy()
            inner = _doubtful(values, node["items"], nulls_doubt[parents]) | \
                values.is_null().to_numpy(zero_copy_only=False)
            doubt |= np.bincount(parents[inner], minlength=len(array)) > 0
    elif "enum" in node:
        doubt |= valid & ~pc.fill_null(pc.is_in(array, value_set=pa.array(node["enum"])),
                                       False).to_numpy(zero_copy_only=False)
    return doubt


def typed_answers(values: list[dict[str, Any] | None], kind: pa.StructType) -> pa.Array:
    """Answer values as a struct array; what has no Arrow shape (free-form objects, mixed
    types, recursive parts) becomes JSON text at any depth."""
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else _fit(v, kind) for v in values], type=kind)


def _fit(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_struct(arrow_type) and isinstance(value, dict):
        return {field.name: _fit(value.get(field.name), field.type) for field in arrow_type}
    if pa.types.is_list(arrow_type) and isinstance(value, list):
        return [_fit(item, arrow_type.value_type) for item in value]
    if arrow_type == pa.string() and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return value


def _arrow_type(node: dict, root: dict, refs: frozenset[str] = frozenset()) -> pa.DataType:
    """The Arrow type of a schema node; a recursive part (a `$ref` to a node that holds
    it) has no fixed shape and is kept as JSON text."""
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        if ref in refs:
            return pa.string()
        target: Any = root
        for key in ref[2:].split("/"):
            target = target.get(key, {})
        return _arrow_type(target, root, refs | {ref})
    options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        return _arrow_type(options[0], root, refs)
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        return pa.list_(_arrow_type(node.get("items") or {}, root, refs))
    if kind == "object" and node.get("properties"):
        return pa.struct([(name, _arrow_type(sub, root, refs))
                          for name, sub in node["properties"].items()])
    return pa.string()


