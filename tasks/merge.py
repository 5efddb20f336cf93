"""Step 7a, merge: every input row exactly once, with its answer as typed columns.

Results of all attempts are reduced in Arrow (the last attempt of each row wins; tokens
add up over attempts, since every answered attempt is billed) and joined to the rows.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import ResponseFormat
from enrichflow.errors import InputError
from tasks import as_task
from tasks.estimate import Price
from tasks.load import KEY
from tasks.render import CUSTOM_ID, custom_ids

TEXT_COLUMN = "response"
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
            "boolean": pa.bool_()}


def answer_columns(response_format: ResponseFormat) -> dict[str, tuple[pa.DataType, dict]]:
    """Output column name -> (Arrow type, JSON schema) for the job's answers."""
    schema = response_format.schema_
    if response_format.type != "json_schema" or not schema:
        return {TEXT_COLUMN: (pa.string(), {"type": "string"})}
    return {name: (_arrow_type(node, schema), node)
            for name, node in schema["properties"].items()}


def check_answer_columns(table: pa.Table, response_format: ResponseFormat) -> None:
    clash = [c for c in answer_columns(response_format) if c in table.column_names]
    if clash:
        raise InputError(f"the answer field(s) {', '.join(clash)} have the name of input "
                         "column(s); rename the schema properties or the columns")


def merge_results(table: pa.Table, job_tag: str, unsent: pa.Table, results: pa.Table,
                  response_format: ResponseFormat, price: Price | None = None) -> pa.Table:
    """`table` (with `_key`) joined with `results` (all attempts, with `_attempt`; 0 for an
    answer reused from the cache) and `unsent` (rows render did not send, with their
    `_status` and `_error`). `_cost_usd` is priced at batch prices, null if unknown."""
    per_row = results.group_by(CUSTOM_ID).aggregate([
        ("_attempt", "max"), ("_attempt", "count"), ("_prompt_tokens", "sum"),
        ("_completion_tokens", "sum")])
    last = results.join(per_row, keys=[CUSTOM_ID, "_attempt"],
                        right_keys=[CUSTOM_ID, "_attempt_max"], join_type="inner")
    rows = pa.table({"_row": pa.array(range(table.num_rows), pa.int64()), KEY: table[KEY],
                     "_sent_id": custom_ids(table[KEY], job_tag)})
    joined = (rows.join(last, keys="_sent_id", right_keys=CUSTOM_ID, join_type="left outer")
              .join(unsent.rename_columns([KEY, "_unsent_status", "_unsent_error"]), keys=KEY,
                    join_type="left outer")
              .sort_by("_row"))

    ok = pc.fill_null(joined["_ok"], False)
    sent = pc.is_null(joined["_unsent_status"])
    reused = pc.fill_null(pc.equal(joined["_attempt"], 0), False)
    prompt, completion = joined["_prompt_tokens_sum"], joined["_completion_tokens_sum"]
    if price is None:
        cost = pa.nulls(joined.num_rows, pa.float64())
    else:
        cost = pc.divide(pc.add(pc.multiply(pc.cast(prompt, pa.float64()), price.batch_input),
                                pc.multiply(pc.cast(completion, pa.float64()),
                                            price.batch_output)), 1e6)
    meta = {
        "_status": pc.if_else(ok, "ok", pc.coalesce(joined["_unsent_status"], "failed")),
        "_error": pc.if_else(sent, pc.if_else(ok, pa.scalar(None, pa.string()), joined["_error"]),
                             joined["_unsent_error"]),
        "_attempts": pc.if_else(reused, 0, pc.fill_null(joined["_attempt_count"], 0)),
        "_reused": reused,
        "_custom_id": pc.if_else(sent, joined["_sent_id"], pa.scalar(None, pa.string())),
        "_batch_id": joined["_batch_id"],
        "_prompt_tokens": prompt,
        "_completion_tokens": completion,
        "_cost_usd": cost,
    }
    answers = _answer_arrays(joined["_answer"].to_pylist(), response_format)
    output = table.drop_columns([KEY])
    for name, column in {**answers, **meta}.items():
        output = output.append_column(name, column)
    return output


def _answer_arrays(raw: list[str | None], response_format: ResponseFormat) -> dict[str, pa.Array]:
    columns = answer_columns(response_format)
    if response_format.type != "json_schema":
        return {TEXT_COLUMN: pa.array(raw, pa.string())}
    parsed = [json.loads(value) if value is not None else {} for value in raw]
    return {name: pa.array([_fit(p.get(name), arrow_type) for p in parsed], type=arrow_type)
            for name, (arrow_type, _) in columns.items()}


def _fit(value: Any, arrow_type: pa.DataType) -> Any:
    """JSON text for what has no Arrow shape (free-form objects, mixed types, recursive
    parts), at any depth of the answer."""
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


merge_results_task = as_task(merge_results, "merge answers into rows")
