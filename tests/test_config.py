"""Job files: every mistake is reported with the file, the field and the fix."""

from __future__ import annotations

import pytest

from enrichflow.config import load_job
from enrichflow.errors import ConfigError, InputError
from enrichflow.tasks.load import Source

VALID = """
name: movies
dataset: {path: data/movies.csv, id_column: Series_Title}
request:
  model: gpt-4o-mini
  user: "Overview: {Overview}"
  response_format:
    type: json_schema
    schema:
      type: object
      properties: {summary: {type: string}}
      required: [summary]
      additionalProperties: false
output: out/movies
"""


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_the_shipped_configs_are_valid():
    job = load_job("configs/movies.yaml")
    assert job.request.columns() == ["Series_Title", "Released_Year", "Genre", "Overview"]
    assert job.limits.max_requests_per_shard == 50_000
    assert job.limits.max_bytes_per_shard == 200 * 1024 * 1024


def test_overrides_reach_nested_fields(tmp_path):
    job = load_job(write(tmp_path, VALID), output="s3://b/x", **{"dataset.limit": 5,
                                                                  "provider.kind": None})
    assert job.output == "s3://b/x" and job.dataset.limit == 5 and job.provider.kind is None


@pytest.mark.parametrize(("text", "expected"), [
    ("name: [unclosed", "not valid YAML"),
    (VALID.replace("output: out/movies", "output: out/movies\noutptu: x"),
     "outptu: unknown field"),
    (VALID.replace("model: gpt-4o-mini", "model: gpt-4o-mini\n  temprature: 0"),
     "request.temprature: unknown field"),
    (VALID.replace("type: json_schema", "type: xml"),
     "request.response_format.type: must be one of 'text', 'json_object' or 'json_schema'"),
    (VALID.replace("type: string}", "type: strng}"),
     "request.response_format: the schema is not valid JSON Schema"),
    (VALID.replace('"Overview: {Overview}"', '"Overview: {Overview:>10}"'),
     "request.user: {Overview...}: format specs and conversions are not supported"),
    (VALID.replace('"Overview: {Overview}"', '"Overview: {}"'),
     "request.user: every {} in the template must name a column"),
    (VALID.replace("name: movies", "name: my movies"), "name: String should match pattern"),
    (VALID.replace("output: out/movies", ""), "output: Field required"),
    ("- a\n- b\n", "a YAML mapping"),
])
def test_bad_job_files_name_the_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert "\n" not in str(info.value), "one line"


def test_missing_job_file():
    with pytest.raises(ConfigError, match="configs/nope.yaml: no such job file"):
        load_job("configs/nope.yaml")


def test_format_comes_from_the_extension(tmp_path):
    (tmp_path / "rows.unknown").write_text("a\n1\n")
    job = load_job(write(tmp_path, VALID.replace("data/movies.csv",
                                                 str(tmp_path / "rows.unknown"))))
    with pytest.raises(InputError, match="cannot tell the format of .* set dataset.format"):
        Source.open(job.dataset)
