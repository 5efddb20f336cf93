"""The steps as plain functions, without Prefect: load, render, count, plan, answers, merge."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import chat_line, collected, read_all, sdk_client, wait_until
from jsonschema import Draft202012Validator

from enrichflow.config import DatasetConfig, RequestConfig, ResponseFormat, load_job
from enrichflow.errors import InputError
from enrichflow.flows.send import without_rows
from enrichflow.providers import openai_batches
from enrichflow.providers.openai_batches import OpenAIBatches
from enrichflow.tasks import answers, load, wait
from enrichflow.tasks.answers import answer_reader, read_answers
from enrichflow.tasks.estimate import Price, chat_prompt_tokens, request_tokens
from enrichflow.tasks.load import KEY, ROW, RowReader, Source, check_unique_keys, key_hashes
from enrichflow.tasks.merge import attempt_results_schema, merge_part
from enrichflow.tasks.plan import BYTES, TOKENS, check_rows_fit, jsonl, line_bytes, plan_shards
from enrichflow.tasks.prepare import prepare_job
from enrichflow.tasks.render import render_requests
from localbatch.engines import MockEngine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tags", "score"],
          "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                         "score": {"type": "integer"}}}


def table(**columns) -> pa.Table:
    first = next(iter(columns.values()))
    return pa.table({**columns, KEY: [str(i) for i in range(len(first))],
                     ROW: pa.array(range(len(first)), pa.int64())})


def load_rows(dataset: DatasetConfig) -> pa.Table:
    """The whole dataset, checked as a run checks it."""
    source = Source.open(dataset)
    rows = read_all(source)
    check_unique_keys(pa.chunked_array([key_hashes(rows[KEY].combine_chunks())]), source)
    return rows


# load -----------------------------------------------------------------------------------

def test_load_keys_rows_by_id_column_or_row_number(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\nb,hello\na,world\n")
    by_id = load_rows(DatasetConfig(path=str(path), id_column="id"))
    assert by_id[KEY].to_pylist() == ["b", "a"] and by_id[ROW].to_pylist() == [0, 1]
    by_row = load_rows(DatasetConfig(path=str(path), limit=1))
    assert by_row[KEY].to_pylist() == ["0"]
    assert len(Source.open(DatasetConfig(path=str(path))).fingerprint()) == 64


@pytest.mark.parametrize("layout", ["folder", "glob", "hive"])
def test_a_dataset_can_be_a_folder_a_glob_or_hive_partitions(tmp_path, layout):
    """Files are read in path order; `key=value` folders become columns; files whose
    name starts with `_` or `.` (a manifest, a journal) are not data."""
    root = tmp_path / "rows"
    names = {"folder": ["a.csv", "b.csv"], "glob": ["a.csv", "b.csv"],
             "hive": ["year=2001/a.csv", "year=2002/b.csv"]}[layout]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"text\nrow {2 * i}\nrow {2 * i + 1}\n")
    (root / "_manifest.json").write_text("{}")
    (root / "_state").mkdir()
    (root / "_state" / "results.csv").write_text("text\nnot data\n")
    path = str(root / "*.csv") if layout == "glob" else str(root)
    rows = load_rows(DatasetConfig(path=path))
    assert rows["text"].to_pylist() == ["row 0", "row 1", "row 2", "row 3"]
    assert rows[KEY].to_pylist() == ["0", "1", "2", "3"]
    if layout == "hive":
        assert rows["year"].to_pylist() == ["2001", "2001", "2002", "2002"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_rows_stream_in_batches_and_read_back_by_range(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(load, "BATCH_ROWS", 7)
    rows = pa.table({"id": [f"r{i}" for i in range(50)], "text": [f"t{i}" for i in range(50)]})
    path = tmp_path / f"rows.{fmt}"
    if fmt == "csv":
        path.write_text("id,text\n" + "".join(f"{a},{b}\n" for a, b in
                                              zip(rows["id"].to_pylist(),
                                                  rows["text"].to_pylist(), strict=True)))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows.to_pylist()))
    else:
        pa.parquet.write_table(rows, path, row_group_size=9)
    source = Source.open(DatasetConfig(path=str(path), id_column="id", limit=45))
    assert all(b.num_rows <= 7 for b in source.batches())
    assert read_all(source)[KEY].to_pylist() == [f"r{i}" for i in range(45)]
    reader = RowReader(source)
    assert reader.read(3, 12)[ROW].to_pylist() == list(range(3, 12))
    assert reader.read(12, 20)[KEY].to_pylist() == [f"r{i}" for i in range(12, 20)]
    assert reader.read(0, 2)[KEY].to_pylist() == ["r0", "r1"]  # back: a new pass
    assert reader.take([1, 8, 9, 44])["text"].to_pylist() == ["t1", "t8", "t9", "t44"]
    assert reader.read(40, 99).num_rows == 5


def test_parquet_files_are_pieces_that_are_read_apart(tmp_path):
    """A scan task reads its own files only: files before its range are skipped by their
    row counts (a file that is not Parquet there would fail the read)."""
    root = tmp_path / "rows"
    root.mkdir()
    for i in range(6):
        pa.parquet.write_table(pa.table({"n": list(range(10 * i, 10 * i + 10))}),
                               root / f"part-{i}.parquet")
    source = Source.open(DatasetConfig(path=str(root)))
    assert source.pieces(20) == [(0, 20), (20, 40), (40, 60)]
    assert source.pieces(25) == [(0, 30), (30, 60)]
    limited = Source.open(DatasetConfig(path=str(root), limit=45))
    assert limited.pieces(20) == [(0, 20), (20, 40), (40, 45)]
    (root / "part-0.parquet").write_bytes(b"not parquet any more")
    assert pa.Table.from_batches(source.batches(20, 35))["n"].to_pylist() == \
        list(range(20, 35))
    assert Source.open(DatasetConfig(path=str(root / "part-1.parquet"))).pieces(5) == \
        [(0, None)]


def test_a_csv_column_that_turns_to_text_past_its_first_rows_is_text_throughout(
        tmp_path, monkeypatch):
    """Types come from a file's first block: a later value that does not fit restarts the
    pass with the column as text, so that every pass and output part types it alike."""
    monkeypatch.setattr(load, "INFER_BYTES", 256)
    monkeypatch.setattr(load, "SMALL_BLOCK_BYTES", 256)
    path = tmp_path / "rows.csv"
    path.write_text("text,score\n" + "".join(f"t{i},{i}\n" for i in range(100)) + "t,unknown\n")
    source = Source.open(DatasetConfig(path=str(path)))
    with pytest.raises(load.TypesWidened):
        read_all(source)
    rows = read_all(source)
    assert rows.schema.field("score").type == pa.string()
    assert rows["score"].to_pylist()[-2:] == ["99", "unknown"]
    job = tmp_path / "job.yaml"
    job.write_text(f"name: rows\ndataset: {{path: {path}}}\n"
                   f"request: {{model: m, user: '{{text}}'}}\noutput: {tmp_path / 'out'}\n")
    prepared = prepare_job(load_job(job), use_cache=False)
    assert prepared.rows == 101 and prepared.source.text_columns == ["score"]


@pytest.mark.parametrize(("content", "id_column", "expected"), [
    (None, None, "does not exist; check the path"),
    ("id,text\n", None, "has no rows"),
    ("id,text\n1,a\n1,b\n", "id", r"1 value\(s\) of id column 'id' appear more than once"),
    ("id,text\n1,a\n", "ident", "'ident' is not a column"),
    ("id,_x\n1,a\n", None, "reserved"),
    ("a,b\n1,2\n3,4,5\n", None, r"not readable as csv \(line 3\): CSV parse error: "
                                 ".*Expected 2 columns, got 3"),
])
def test_load_errors_name_the_file_and_the_fix(tmp_path, content, id_column, expected):
    path = tmp_path / "rows.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=expected) as info:
        load_rows(DatasetConfig(path=str(path), id_column=id_column))
    assert str(path) in str(info.value)


def test_a_csv_read_as_parquet_names_the_file_and_the_setting(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n1,a\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: rows\ndataset: {{path: {path}, format: parquet}}\n"
                   f"request: {{model: m, user: '{{text}}'}}\noutput: {tmp_path / 'out'}\n")
    with pytest.raises(InputError) as info:
        prepare_job(load_job(job), use_cache=False)
    assert str(info.value).startswith(f"dataset.path: {path} is not readable as parquet "
                                      "(dataset.format): ")
    assert str(info.value).endswith("set dataset.format to the format it is in: csv, "
                                    "parquet or jsonl")


@pytest.mark.parametrize("user", ["'{text}'", "[{type: text, text: '{text}'}]"])
def test_a_cell_too_long_to_count_names_its_row_and_column(tmp_path, user):
    """bpe-openai refuses to count a text of 1,000,000 characters or more."""
    path = tmp_path / "rows.csv"
    path.write_text("id,text\nshort,a\nlong," + "word " * 1_000_000 + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: rows\ndataset: {{path: {path}, id_column: id}}\n"
                   f"request: {{model: gpt-4o-mini, user: {user}}}\n"
                   f"output: {tmp_path / 'out'}\n")
    with pytest.raises(InputError) as info:
        prepare_job(load_job(job), use_cache=False)
    assert str(info.value) == (
        f"{path}: row 'long': its prompt holds a text of 1,000,000 characters or more (from "
        "text), more than the tokenizer counts and than any model reads in one request; "
        "shorten that cell, or leave the row out of the dataset")


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
    loaded = load_rows(DatasetConfig(path=str(path), encoding="latin-1"))
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
    assert load_rows(DatasetConfig(path=str(big), id_column="id")).num_rows == 2


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
        {ROW: 1, KEY: "1", "_status": "skipped", "_error": "skipped: column 'a' is empty"},
        {ROW: 2, KEY: "2", "_status": "skipped", "_error": "skipped: column 'a' is empty"},
        {ROW: 3, KEY: "3", "_status": "skipped", "_error": "skipped: column 'b' is empty"}]


def test_render_names_missing_columns():
    with pytest.raises(InputError, match="column\\(s\\) Overviw that data.csv does not have"):
        render_requests(table(Overview=["x"]), RequestConfig(model="m", user="{Overviw}"), "t",
                        "data.csv")


# count ----------------------------------------------------------------------------------

TRICKY = ["", " ", "plain words", "  leading and trailing  ", "line\nbreaks\r\n\tand tabs",
          "unicode: é 漢字 🎬 ﷽", "quotes \" and \\ slashes", "<|endoftext|> special?",
          "x" * 20_000, "word " * 3_000, "1234567890" * 50, "emoji 👩‍👩‍👧‍👦 joined"]


@pytest.mark.parametrize("system", [None, "You are terse.\nAnswer in JSON."])
def test_fast_token_counts_equal_counting_each_request_whole(system):
    """The template's shared text counted once gives exactly the per-request count, on
    the sample data and on tricky text (empty, whitespace, unicode, very long cells)."""
    movies = pa.csv.read_csv("data/movies.csv")
    request = RequestConfig(model="gpt-4o-mini", system=system,
                            user="Title: {Series_Title}\nOverview: {Overview}\n{extra}")
    extra = (TRICKY * 20)[:movies.num_rows]
    rows = movies.append_column("extra", pa.array(extra)).append_column(
        KEY, pa.array([str(i) for i in range(movies.num_rows)])).append_column(
        ROW, pa.array(range(movies.num_rows), pa.int64()))
    requests = render_requests(rows, request, "t").requests
    whole = [chat_prompt_tokens(json.loads(line)["body"])
             for line in requests["_line"].to_pylist()]
    assert request_tokens(requests, request).tolist() == whole
    bare = RequestConfig(model="gpt-4o-mini", system=system, user="{extra}")
    tricky = render_requests(table(extra=TRICKY), bare, "t").requests
    assert request_tokens(tricky, bare).tolist() == [
        chat_prompt_tokens(json.loads(line)["body"]) for line in tricky["_line"].to_pylist()]


# plan -----------------------------------------------------------------------------------

def sized(requests: pa.Table, tokens: list[int]) -> pa.Table:
    return requests.append_column(TOKENS, pa.array(tokens, pa.int64())).append_column(
        BYTES, line_bytes(requests))


def test_shards_respect_request_and_byte_limits():
    request = RequestConfig(model="m", user="{text}")
    rendered = render_requests(table(text=["x" * (i % 7 * 30) + "y" for i in range(100)]),
                               request, "t").requests
    sizes = [len(line.encode()) for line in rendered["_line"].to_pylist()]
    rendered = sized(rendered, [10] * rendered.num_rows)
    shards = plan_shards(rendered, max_requests=30, max_bytes=2000)
    assert shards[0].start == 0 and shards[-1].end == 100
    assert all(a.end == b.start for a, b in zip(shards, shards[1:], strict=False))
    for shard in shards:
        assert shard.rows <= 30 and shard.bytes <= 2000
        assert shard.bytes == sum(sizes[shard.start:shard.end])
        payload = jsonl(rendered.slice(shard.start, shard.rows))
        assert len(payload) == shard.bytes
        assert payload.decode() == "".join(rendered["_line"].to_pylist()[shard.start:shard.end])
    by_count = plan_shards(rendered, max_requests=30, max_bytes=10**6)
    assert [s.rows for s in by_count] == [30, 30, 30, 10]
    by_tokens = plan_shards(rendered, max_requests=30, max_bytes=10**6, max_tokens=250)
    assert [s.rows for s in by_tokens] == [25, 25, 25, 25]
    assert [s.tokens for s in by_tokens] == [250] * 4



def test_shards_planned_over_the_scan_pieces_are_those_of_one_table():
    """prepare keeps the requests to send in the scan's pieces, one chunk each; the plan
    sums sizes a shard at a time, across the pieces' seams."""
    sizes = pa.table({BYTES: pa.array([(i * 37) % 500 + 1 for i in range(1000)], pa.int32()),
                      TOKENS: pa.array([(i * 53) % 300 + 1 for i in range(1000)], pa.int32())})
    pieces = pa.concat_tables([sizes.slice(0, 333), sizes.slice(333, 1), sizes.slice(334)])
    assert pieces[BYTES].num_chunks == 3
    for limits in [(30, 10**6, None), (500, 6000, None), (500, 10**6, 4000), (3, 10, 10)]:
        shards = plan_shards(pieces, *limits)
        assert shards == plan_shards(sizes, *limits)
        assert [(s.bytes, s.tokens) for s in shards] == [
            (sum(sizes[BYTES].to_pylist()[s.start:s.end]),
             sum(sizes[TOKENS].to_pylist()[s.start:s.end])) for s in shards]
        assert shards[-1].end == 1000 and all(s.rows <= limits[0] for s in shards)

def test_a_row_larger_than_the_byte_limit_is_named():
    rendered = render_requests(table(text=["short", "x" * 500]),
                               RequestConfig(model="m", user="{text}"), "t").requests
    rendered = sized(rendered, [5, 120])
    with pytest.raises(InputError, match="row '1' renders to 628 bytes, more than "
                                         "limits.max_bytes_per_shard"):
        check_rows_fit(rendered, 400, None)
    with pytest.raises(InputError, match="row '1' renders to 120 prompt tokens, more than "
                                         "the enqueued-token budget"):
        check_rows_fit(rendered, 10**6, 100)


def test_the_canarys_first_rows_are_cut_off_without_a_copy_others_are_filtered_out():
    requests = pa.table({ROW: pa.array(range(10, 20), pa.int64()),
                         TOKENS: pa.array(range(10), pa.int64())})
    cut = without_rows(requests, pa.array([11, 10], pa.int64()))  # the canary's: the first
    assert cut[ROW].to_pylist() == list(range(12, 20))
    assert cut[TOKENS].chunk(0).buffers()[1].address == \
        requests[TOKENS].chunk(0).buffers()[1].address, "a slice of the same memory"
    assert without_rows(requests, pa.array([12, 15], pa.int64()))[ROW].to_pylist() == [
        10, 11, 13, 14, 16, 17, 18, 19]
    assert without_rows(requests, pa.array([], pa.int64())).num_rows == 10


# answers --------------------------------------------------------------------------------

NESTED = {"type": "object", "additionalProperties": False, "required": ["tags", "score", "who"],
          "properties": {
              "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
              "score": {"type": ["integer", "null"]},
              "who": {"type": "object", "required": ["name"], "additionalProperties": False,
                      "properties": {"name": {"type": "string"},
                                     "age": {"anyOf": [{"type": "number"},
                                                       {"type": "null"}]}}}}}


CLOSED = {"type": "object", "additionalProperties": False, "required": ["tags", "score", "who"],
          "properties": {
              "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
              "score": {"type": "integer"},
              "who": {"type": "object", "required": ["name"], "additionalProperties": False,
                      "properties": {"name": {"type": "string"}, "age": {"type": "number"}}},
              "notes": {"type": "array", "items": {
                  "type": "object", "additionalProperties": False, "required": ["text"],
                  "properties": {"text": {"type": "string"}}}}}}
ANSWERS = [
    {"tags": ["a"], "score": 1, "who": {"name": "x"}},
    {"tags": [], "score": 2, "who": {"name": "x", "age": 3.5}, "notes": [{"text": "n"}]},
    {"tags": ["a"], "score": 1.0, "who": {"name": "x"}},
    {"tags": ["c"], "score": 1, "who": {"name": "x"}},
    {"tags": ["a"], "score": True, "who": {"name": "x"}},
    {"tags": ["a"], "score": "1", "who": {"name": "x"}},
    {"tags": "a", "score": 1, "who": {"name": "x"}},
    {"tags": ["a"], "score": 1},
    {"tags": ["a"], "score": None, "who": {"name": "x"}},
    {"tags": ["a"], "score": 1, "who": {"name": "x", "extra": 1}},
    {"tags": ["a"], "score": 1, "who": {"name": 5}},
    {"tags": ["a"], "score": 1, "who": {"name": "x"}, "more": 1},
    {"tags": ["a"], "score": 1, "who": {"name": "x"}, "notes": [{}]},
    {"tags": ["a"], "score": 1, "who": {"name": "x"}, "notes": [{"text": None}]},
    [], "text", None,
]


def present(value):
    """The value without its null fields (a missing field reads as null), at any depth."""
    if isinstance(value, dict):
        return {k: present(v) for k, v in value.items() if v is not None}
    return [present(v) for v in value] if isinstance(value, list) else value


def asking(response_format: ResponseFormat) -> RequestConfig:
    """A chat request whose answers have `response_format`."""
    return RequestConfig(model="m", user="{title}", response_format=response_format)


@pytest.mark.parametrize("schema", [CLOSED, NESTED], ids=["closed", "open"])
def test_answers_read_column_wise_agree_with_jsonschema(schema):
    """Every answer valid by jsonschema is kept, typed; every other one has jsonschema's
    error; `{...}\n` pretty-printed answers are read one by one."""
    answers = [json.dumps(a) for a in ANSWERS] + [json.dumps(ANSWERS[0], indent=1)]
    expected = ANSWERS + [ANSWERS[0]]
    fmt = asking(ResponseFormat(type="json_schema", schema=schema))
    values, problems = read_answers(pa.array(answers), pa.array(["stop"] * len(answers)), fmt)
    validator = Draft202012Validator(schema)
    for answer, value, problem in zip(expected, values.to_pylist(), problems, strict=True):
        if validator.is_valid(answer):
            assert problem is None and value is not None
            assert present(value) == present(answer)
        else:
            assert value is None and problem.startswith("the answer does not fit the schema")


def test_valid_answers_of_a_closed_schema_are_never_checked_one_by_one(monkeypatch):
    valid = [json.dumps(a) for a in ANSWERS[:2]] * 50
    monkeypatch.setattr(answers, "answer_reader", lambda fmt: pytest.fail("read one by one"))
    values, problems = read_answers(pa.array(valid), pa.array(["stop"] * len(valid)),
                                    asking(ResponseFormat(type="json_schema", schema=CLOSED)))
    assert problems == [None] * 100 and values.to_pylist()[1]["who"]["age"] == 3.5


# merge ----------------------------------------------------------------------------------


def result(row, attempt, ok, value=None, error=None, tokens=(10, 5)):
    return {ROW: row, "_custom_id": f"t-{row}", "_batch_id": f"batch_{attempt}", "_ok": ok,
            "_error": error, "_retryable": not ok, "_answer": json.dumps(value) if ok else None,
            "_finish_reason": None, "_prompt_tokens": tokens[0],
            "_completion_tokens": tokens[1], "_value": value, "_attempt": attempt}


def results(request: RequestConfig, *rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=attempt_results_schema(request))


def unsent_rows(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=pa.schema([
        (ROW, pa.int64()), ("_status", pa.string()), ("_error", pa.string())]))


def test_merge_keeps_every_row_once_with_typed_answers():
    rows = table(title=["a", "b", "c", "d", "e"])
    unsent = unsent_rows({ROW: 3, "_status": "skipped", "_error": "skipped: column 'x' is empty"})
    request = asking(ResponseFormat(type="json_schema", schema=SCHEMA))
    merged = merge_part(rows, "t", results(
        request,
        result(2, 1, False, error="batch_expired: late", tokens=(None, None)),
        result(0, 1, True, {"tags": ["x", "y"], "score": 3}),
        result(1, 1, False, error="HTTP 500: boom", tokens=(None, None)),
        result(1, 2, True, {"tags": [], "score": 1}),
        result(2, 2, False, error="not valid JSON", tokens=(7, 3)),
    ), unsent, request,
        Price(input=2, output=8, batch_input=1, batch_output=4, source="test"))
    assert merged.column_names == ["title", "tags", "score", "_status", "_error", "_attempts",
                                   "_reused", "_custom_id", "_batch_id", "_prompt_tokens",
                                   "_completion_tokens", "_cost_usd"]
    assert merged.schema.field("tags").type == pa.list_(pa.string())
    assert merged.schema.field("score").type == pa.int64()
    data = merged.to_pylist()
    assert [r["title"] for r in data] == ["a", "b", "c", "d", "e"]
    assert [r["_status"] for r in data] == ["ok", "ok", "failed", "skipped", "failed"]
    assert data[0]["tags"] == ["x", "y"] and data[0]["_error"] is None
    assert data[1]["_attempts"] == 2 and data[1]["_batch_id"] == "batch_2"
    assert data[2]["_error"] == "not valid JSON" and data[2]["tags"] is None
    assert data[2]["_prompt_tokens"] == 7
    assert data[2]["_cost_usd"] == pytest.approx((7 * 1 + 3 * 4) / 1e6)
    assert data[0]["_cost_usd"] == pytest.approx((10 * 1 + 5 * 4) / 1e6)
    assert not any(r["_reused"] for r in data)
    assert data[3]["_custom_id"] is None and data[3]["_attempts"] == 0
    assert data[3]["_error"] == "skipped: column 'x' is empty"
    assert data[4]["_error"] == "cancelled before it was sent"  # sent, but never answered


def test_a_recursive_schema_keeps_its_recursive_part_as_json_text():
    """Valid for OpenAI; it once ended in 'maximum recursion depth exceeded'."""
    node = {"type": "object", "additionalProperties": False, "required": ["name", "children"],
            "properties": {"name": {"type": "string"},
                           "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
    schema = {"type": "object", "additionalProperties": False, "required": ["tree"],
              "properties": {"tree": {"$ref": "#/$defs/node"}}, "$defs": {"node": node}}
    request = asking(ResponseFormat(type="json_schema", schema=schema))
    status, body = MockEngine().answer("/v1/chat/completions", {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "oak tree"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    answer = body["choices"][0]["message"]["content"]
    assert status == 200
    value, problem = answer_reader(request)(answer, "stop")
    assert problem is None
    merged = merge_part(table(title=["a"]), "t", results(request, result(0, 1, True)),
                        unsent_rows(), request)
    assert merged.schema.field("tree").type == pa.struct([
        ("name", pa.string()), ("children", pa.list_(pa.string()))])
    merged = merge_part(table(title=["a"]), "t", pa.concat_tables([
        results(request), _with_value(request, value)]), unsent_rows(),
        request)
    (tree,) = merged["tree"].to_pylist()
    assert tree["name"] == "oak tree"
    assert [json.loads(child)["name"] for child in tree["children"]] == ["oak tree"] * 3


def _with_value(request: RequestConfig, value: dict) -> pa.Table:
    from enrichflow.tasks.answers import answer_type, typed_answers
    row = results(request, result(0, 1, True))
    return row.set_column(row.schema.get_field_index("_value"), "_value",
                          typed_answers([value], answer_type(request)))


def test_merge_of_a_text_answer_is_one_response_column():
    request = asking(ResponseFormat())
    merged = merge_part(table(title=["a"]), "t", results(
        request, result(0, 1, True, {"response": "A fine film."})), unsent_rows(),
        request)
    assert merged.to_pylist()[0]["response"] == "A fine film."


# wait -----------------------------------------------------------------------------------

def test_batches_are_looked_at_with_one_list_call_and_found_past_it(start_localbatch,
                                                                    monkeypatch):
    """Running shards are read from one list of the newest batches; a batch past that
    list (here: past 2) is retrieved on its own, so none is ever missed."""
    monkeypatch.setattr(openai_batches, "LIST_LIMIT", 2)
    client = sdk_client(start_localbatch().base_url)
    ids = []
    for i in range(3):
        file = client.files.create(file=("in.jsonl", chat_line(f"r{i}", "x").encode()),
                                   purpose="batch")
        ids.append(client.batches.create(input_file_id=file.id, completion_window="24h",
                                         endpoint="/v1/chat/completions").id)
    done = [wait_until(client, batch_id) for batch_id in ids]
    seen = wait.look_at_batches(OpenAIBatches(client, "local"), ids)
    assert [b.model_dump() for b in seen] == [b.model_dump() for b in done]


def test_a_row_the_batch_returned_no_line_for_goes_round_again(tmp_path):
    """A batch cancelled before it ran, or one that lost a line: the row is retried."""
    body = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    line = {"custom_id": "answered", "response": {"status_code": 200, "body": body},
            "error": None}
    answered, missing = collected([line], RequestConfig(model="m", user="{x}"), tmp_path,
                                  custom_ids=["answered", "missing"])
    assert answered["_ok"] and answered["_value"] == {"response": "hi"}
    assert missing["_error"] == "batch batch_x returned no result for this row"
    assert missing["_retryable"] and not missing["_ok"]
