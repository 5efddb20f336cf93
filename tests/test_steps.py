"""The steps as plain functions, without Prefect: load, render, plan, merge."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from enrichflow.config import DatasetConfig, RequestConfig, ResponseFormat
from enrichflow.errors import InputError
from localbatch.engines import MockEngine
from tasks.collect import ATTEMPT_RESULTS
from tasks.estimate import Price
from tasks.load import KEY, load_rows
from tasks.merge import merge_results
from tasks.plan import TOKENS, plan_shards, shard_jsonl
from tasks.render import render_requests

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tags", "score"],
          "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                         "score": {"type": "integer"}}}


def table(**columns) -> pa.Table:
    first = next(iter(columns.values()))
    return pa.table({**columns, KEY: [str(i) for i in range(len(first))]})


# load -----------------------------------------------------------------------------------

def test_load_keys_rows_by_id_column_or_row_number(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\nb,hello\na,world\n")
    by_id = load_rows(DatasetConfig(path=str(path), id_column="id"))
    assert by_id.table[KEY].to_pylist() == ["b", "a"]
    by_row = load_rows(DatasetConfig(path=str(path), limit=1))
    assert by_row.table[KEY].to_pylist() == ["0"] and len(by_row.fingerprint) == 64


@pytest.mark.parametrize(("content", "id_column", "expected"), [
    (None, None, "does not exist; check the path"),
    ("id,text\n", None, "has no rows"),
    ("id,text\n1,a\n1,b\n", "id", r"1 value\(s\) of id column 'id' appear more than once"),
    ("id,text\n1,a\n", "ident", "'ident' is not a column"),
    ("id,_x\n1,a\n", None, "reserved"),
    ("a,b\n1,2\n3,4,5\n", None, r"not readable as csv \(line 3\): CSV parse error: "
                                 "Expected 2 columns, got 3"),
])
def test_load_errors_name_the_file_and_the_fix(tmp_path, content, id_column, expected):
    path = tmp_path / "rows.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=expected) as info:
        load_rows(DatasetConfig(path=str(path), id_column=id_column))
    assert str(path) in str(info.value)


# render ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rows.csv", "rows.jsonl"])
def test_text_that_is_not_utf8_is_refused_unless_its_encoding_is_given(tmp_path, name):
    """Even in a column the template does not use: it would be written as bytes."""
    path = tmp_path / name
    rows = [{"title": "Amélie", "note": "déjà vu"}, {"title": "Heat", "note": "café"}]
    if name.endswith(".csv"):
        text = "title,note\n" + "".join(f"{r['title']},{r['note']}\n" for r in rows)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=rf"{name}: column 'title' is not UTF-8 text \(row 1\);"
                                         r" set dataset.encoding to the file's encoding"):
        load_rows(DatasetConfig(path=str(path)))
    loaded = load_rows(DatasetConfig(path=str(path), encoding="latin-1")).table
    assert loaded.select(["title", "note"]).to_pylist() == rows


def test_an_unknown_encoding_is_a_job_file_error():
    with pytest.raises(ValueError, match="unknown encoding 'utf-9'"):
        DatasetConfig(path="rows.csv", encoding="utf-9")


def test_a_struct_id_column_and_a_huge_cell_are_named_or_read(tmp_path):
    nested = tmp_path / "rows.jsonl"
    nested.write_text('{"id": {"k": 1}, "text": "a"}\n')
    with pytest.raises(InputError, match=r"dataset.id_column: 'id' of .*rows.jsonl holds "
                                         r"struct<k: int64> values; an id column holds text"):
        load_rows(DatasetConfig(path=str(nested), id_column="id"))
    big = tmp_path / "big.csv"  # a 5 MB cell once failed: "straddles two block boundaries"
    big.write_text("id,text\n1," + "x" * 5_000_000 + "\n2,short\n")
    assert load_rows(DatasetConfig(path=str(big), id_column="id")).table.num_rows == 2


def test_render_escapes_text_exactly_as_json_does():
    texts = ['He said "hi"\nthen left', "back\\slash\ttab", "unicode: é 漢字 🎬",
             "control \x01\x1f char", "{braces} and 'quotes'"]
    request = RequestConfig(model="m", system="Be brief.", user="Text: {text} / {n}",
                            temperature=0.2, extra={"logprobs": False})
    rendered = render_requests(table(text=texts, n=[1, 2, 3, 4, 5]), request, "job1")
    lines = [json.loads(line) for line in rendered.requests["_line"].to_pylist()]
    for i, line in enumerate(lines):
        assert line == {
            "custom_id": f"job1-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "temperature": 0.2, "logprobs": False, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Text: {texts[i]} / {i + 1}"}]}}


def test_rows_with_an_empty_template_column_are_skipped_not_sent():
    request = RequestConfig(model="m", user="{a} {b}")
    rendered = render_requests(table(a=["x", None, "  ", "y"], b=["1", "2", "3", None]),
                               request, "t")
    assert rendered.requests["_custom_id"].to_pylist() == ["t-0"]
    assert rendered.unsent.to_pylist() == [
        {KEY: "1", "_status": "skipped", "_error": "skipped: column 'a' is empty"},
        {KEY: "2", "_status": "skipped", "_error": "skipped: column 'a' is empty"},
        {KEY: "3", "_status": "skipped", "_error": "skipped: column 'b' is empty"}]


def test_render_names_missing_columns():
    with pytest.raises(InputError, match="column\\(s\\) Overviw that data.csv does not have"):
        render_requests(table(Overview=["x"]), RequestConfig(model="m", user="{Overviw}"), "t",
                        "data.csv")


# plan -----------------------------------------------------------------------------------

def test_shards_respect_request_and_byte_limits():
    request = RequestConfig(model="m", user="{text}")
    rendered = render_requests(table(text=["x" * (i % 7 * 30) + "y" for i in range(100)]),
                               request, "t").requests
    sizes = [len(line.encode()) + 1 for line in rendered["_line"].to_pylist()]
    rendered = rendered.append_column(TOKENS, pa.array([10] * rendered.num_rows, pa.int64()))
    shards = plan_shards(rendered, max_requests=30, max_bytes=2000)
    assert shards[0].start == 0 and shards[-1].end == 100
    assert all(a.end == b.start for a, b in zip(shards, shards[1:], strict=False))
    for shard in shards:
        assert shard.rows <= 30 and shard.bytes <= 2000
        assert shard.bytes == sum(sizes[shard.start:shard.end])
        payload = shard_jsonl(rendered, shard)
        assert len(payload) == shard.bytes
        assert payload.decode().splitlines() == rendered["_line"].to_pylist()[shard.start:
                                                                                shard.end]
    by_count = plan_shards(rendered, max_requests=30, max_bytes=10**6)
    assert [s.rows for s in by_count] == [30, 30, 30, 10]
    by_tokens = plan_shards(rendered, max_requests=30, max_bytes=10**6, max_tokens=250)
    assert [s.rows for s in by_tokens] == [25, 25, 25, 25]
    assert [s.tokens for s in by_tokens] == [250] * 4


def test_a_row_larger_than_the_byte_limit_is_named():
    rendered = render_requests(table(text=["short", "x" * 500]),
                               RequestConfig(model="m", user="{text}"), "t").requests
    rendered = rendered.append_column(TOKENS, pa.array([5, 120], pa.int64()))
    with pytest.raises(InputError, match="row '1' renders to 628 bytes, more than "
                                         "limits.max_bytes_per_shard"):
        plan_shards(rendered, 10, 400)
    with pytest.raises(InputError, match="row '1' renders to 120 prompt tokens, more than "
                                         "the enqueued-token budget"):
        plan_shards(rendered, 10, 10**6, max_tokens=100)


# merge ----------------------------------------------------------------------------------

def result(custom_id, attempt, ok, answer=None, error=None, tokens=(10, 5)):
    return {"_custom_id": custom_id, "_batch_id": f"batch_{attempt}", "_ok": ok,
            "_error": error, "_retryable": not ok, "_answer": answer, "_finish_reason": None,
            "_prompt_tokens": tokens[0], "_completion_tokens": tokens[1], "_attempt": attempt}


def test_merge_keeps_every_row_once_with_typed_answers():
    rows = table(title=["a", "b", "c", "d"])
    unsent = pa.table({KEY: ["3"], "_status": ["skipped"],
                       "_error": ["skipped: column 'x' is empty"]})
    results = pa.Table.from_pylist(schema=ATTEMPT_RESULTS, mapping=[
        result("t-0", 1, True, json.dumps({"tags": ["x", "y"], "score": 3})),
        result("t-1", 1, False, error="HTTP 500: boom", tokens=(None, None)),
        result("t-1", 2, True, json.dumps({"tags": [], "score": 1})),
        result("t-2", 1, False, error="batch_expired: late", tokens=(None, None)),
        result("t-2", 2, False, error="not valid JSON", tokens=(7, 3)),
    ])
    merged = merge_results(rows, "t", unsent, results,
                           ResponseFormat(type="json_schema", schema=SCHEMA),
                           Price(input=2, output=8, batch_input=1, batch_output=4, source="test"))
    assert merged.column_names == ["title", "tags", "score", "_status", "_error", "_attempts",
                                   "_reused", "_custom_id", "_batch_id", "_prompt_tokens",
                                   "_completion_tokens", "_cost_usd"]
    assert merged.schema.field("tags").type == pa.list_(pa.string())
    assert merged.schema.field("score").type == pa.int64()
    data = merged.to_pylist()
    assert [r["title"] for r in data] == ["a", "b", "c", "d"]
    assert [r["_status"] for r in data] == ["ok", "ok", "failed", "skipped"]
    assert data[0]["tags"] == ["x", "y"] and data[0]["_error"] is None
    assert data[1]["_attempts"] == 2 and data[1]["_batch_id"] == "batch_2"
    assert data[2]["_error"] == "not valid JSON" and data[2]["tags"] is None
    assert data[2]["_prompt_tokens"] == 7
    assert data[2]["_cost_usd"] == pytest.approx((7 * 1 + 3 * 4) / 1e6)
    assert data[0]["_cost_usd"] == pytest.approx((10 * 1 + 5 * 4) / 1e6)
    assert not any(r["_reused"] for r in data)
    assert data[3]["_custom_id"] is None and data[3]["_attempts"] == 0
    assert data[3]["_error"] == "skipped: column 'x' is empty"


def test_a_recursive_schema_keeps_its_recursive_part_as_json_text():
    """Valid for OpenAI; it once ended in 'maximum recursion depth exceeded'."""
    node = {"type": "object", "additionalProperties": False, "required": ["name", "children"],
            "properties": {"name": {"type": "string"},
                           "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
    schema = {"type": "object", "additionalProperties": False, "required": ["tree"],
              "properties": {"tree": {"$ref": "#/$defs/node"}}, "$defs": {"node": node}}
    response_format = ResponseFormat(type="json_schema", schema=schema)
    status, body = MockEngine().answer("/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "oak tree"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    answer = body["choices"][0]["message"]["content"]
    assert status == 200
    results = pa.Table.from_pylist(schema=ATTEMPT_RESULTS, mapping=[
        result("t-0", 1, True, answer)])
    merged = merge_results(table(title=["a"]), "t", pa.table({KEY: pa.array([], pa.string()),
                           "_status": pa.array([], pa.string()),
                           "_error": pa.array([], pa.string())}), results, response_format)
    assert merged.schema.field("tree").type == pa.struct([
        ("name", pa.string()), ("children", pa.list_(pa.string()))])
    (tree,) = merged["tree"].to_pylist()
    assert tree["name"] == "oak tree"
    assert [json.loads(child)["name"] for child in tree["children"]] == ["oak tree"] * 3


def test_merge_of_a_text_answer_is_one_response_column():
    results = pa.Table.from_pylist([result("t-0", 1, True, "A fine film.")],
                                   schema=ATTEMPT_RESULTS)
    nothing_unsent = pa.table({name: pa.array([], pa.string())
                               for name in (KEY, "_status", "_error")})
    merged = merge_results(table(title=["a"]), "t", nothing_unsent, results, ResponseFormat())
    assert merged.to_pylist()[0]["response"] == "A fine film."
