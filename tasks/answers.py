"""What an answer is: its Arrow columns, its check against the job's schema, its values.

An answer is parsed once (orjson), checked by a compiled check for the JSON Schema most
jobs use (types, required, enum, `additionalProperties: false`, arrays, nested objects;
`jsonschema` decides the rest and words every error), and turned into typed Arrow
columns: a list of categories is a list column, an object a struct.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
from jsonschema import Draft202012Validator

from enrichflow.config import ResponseFormat
from enrichflow.errors import InputError

TEXT_COLUMN = "response"
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
            "boolean": pa.bool_()}
_SUBSET = {"type", "properties", "required", "additionalProperties", "items", "enum",
           "anyOf", "description", "title"}


def answer_columns(response_format: ResponseFormat) -> dict[str, tuple[pa.DataType, dict]]:
    """Output column name -> (Arrow type, JSON schema) for the job's answers."""
    schema = response_format.schema_
    if response_format.type != "json_schema" or not schema:
        return {TEXT_COLUMN: (pa.string(), {"type": "string"})}
    return {name: (_arrow_type(node, schema), node)
            for name, node in schema["properties"].items()}


def answer_type(response_format: ResponseFormat) -> pa.StructType:
    """One answer as a struct of its output columns."""
    return pa.struct([(name, kind) for name, (kind, _) in answer_columns(response_format).items()])


def check_answer_columns(table: pa.Table, response_format: ResponseFormat) -> None:
    clash = [c for c in answer_columns(response_format) if c in table.column_names]
    if clash:
        raise InputError(f"the answer field(s) {', '.join(clash)} have the name of input "
                         "column(s); rename the schema properties or the columns")


def answer_reader(response_format: ResponseFormat
                  ) -> Callable[[str, str | None], tuple[Any, str | None]]:
    """A function (content, finish_reason) -> (answer value, problem) for the job's
    format; the value is a dict of the answer's columns."""
    if response_format.type == "text":
        return lambda content, _: ({TEXT_COLUMN: content}, None)
    schema = response_format.schema_
    validator = Draft202012Validator(schema) if schema else None
    fast = _compile(schema) if schema else None

    def read(content: str, finish_reason: str | None) -> tuple[Any, str | None]:
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            hint = " (cut at max_tokens: raise it)" if finish_reason == "length" else ""
            return None, f"the answer is not valid JSON{hint}: {content[:120]!r}"
        if validator is None:  # json_object: the answer is kept as JSON text
            return ({TEXT_COLUMN: content}, None) if isinstance(parsed, dict) else \
                (None, "the answer is not a JSON object")
        if fast is None or not fast(parsed):
            error = next(iter(validator.iter_errors(parsed)), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                return None, f"the answer does not fit the schema at {where}: {error.message}"
        return parsed, None

    return read


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


def _is(kind: str, value: Any) -> bool:
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list,
                              "null": type(None)}[kind])


def _compile(node: Any) -> Callable[[Any], bool] | None:
    """A fast check of a value against a schema node written in the common subset; None
    for a node outside it (jsonschema checks those). True means valid; False means
    jsonschema is asked, and words the error."""
    if not isinstance(node, dict) or set(node) - _SUBSET:
        return None
    checks: list[Callable[[Any], bool]] = []
    if "type" in node:
        kinds = [node["type"]] if isinstance(node["type"], str) else node["type"]
        if not isinstance(kinds, list) or not all(
                k in {"string", "integer", "number", "boolean", "object", "array", "null"}
                for k in kinds):
            return None
        checks.append(lambda v: any(_is(k, v) for k in kinds))
    if "enum" in node:
        allowed = node["enum"]
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            return None
        checks.append(lambda v: isinstance(v, str) and v in allowed)
    if "anyOf" in node:
        options = [_compile(option) for option in node["anyOf"]]
        if any(option is None for option in options):
            return None
        checks.append(lambda v: any(option(v) for option in options))
    properties = {}
    for name, sub in (node.get("properties") or {}).items():
        properties[name] = _compile(sub)
        if properties[name] is None:
            return None
    required = node.get("required", [])
    closed = node.get("additionalProperties", True)
    if closed not in (True, False):
        return None
    if properties or required or closed is False:
        def object_ok(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            return all(r in v for r in required) and \
                (closed or v.keys() <= properties.keys()) and \
                all(check(v[name]) for name, check in properties.items() if name in v)
        checks.append(object_ok)
    if "items" in node:
        items = _compile(node["items"])
        if items is None:
            return None
        checks.append(lambda v: not isinstance(v, list) or all(items(i) for i in v))
    return lambda v: all(check(v) for check in checks)
