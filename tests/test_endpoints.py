"""Jobs on the other endpoints: embeddings (a vector column) and the Responses API (the
same typed answers as chat), through real Prefect and the local server over HTTP."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import collected, job_file, sdk_client

from enrichflow.config import RequestConfig, ResponseFormat
from enrichflow.flows.enrich import enrich
from enrichflow.tasks.render import LINE, render_requests

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tags"],
          "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}


def test_an_embeddings_job_writes_fixed_size_float32_vectors_and_reuses_them(
        prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    path = job_file(tmp_path, config="movie_embeddings")
    manifest = enrich(str(path), base_url=server.base_url)

    table = ds.dataset(tmp_path / "out").to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all() and len(data) == manifest["rows"]
    vectors = np.stack(data["embedding"].to_numpy())
    assert vectors.shape == (len(data), 256) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)  # the mock's unit vectors
    assert manifest["tokens"]["prompt"] > 0 and manifest["tokens"]["completion"] == 0
    assert manifest["cost_usd"] > 0

    batches = len(sdk_client(server.base_url).batches.list().data)
    again = enrich(str(path), base_url=server.base_url, force=True)
    assert again["rows_reused"] == len(data)
    assert len(sdk_client(server.base_url).batches.list().data) == batches
    assert np.array_equal(np.stack(pd.read_parquet(tmp_path / "out")["embedding"].to_numpy()),
                          vectors)


def test_the_movies_job_on_the_responses_api_gives_the_same_typed_columns(
        prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    (tmp_path / "chat").mkdir()
    (tmp_path / "responses").mkdir()
    chat = enrich(str(job_file(tmp_path / "chat", **{"dataset.limit": 30})),
                  base_url=server.base_url)
    responses = enrich(str(job_file(tmp_path / "responses", **{
        "dataset.limit": 30, "request.endpoint": "/v1/responses"})), base_url=server.base_url)
    assert responses["rows_by_status"] == chat["rows_by_status"] == {"ok": 30}
    by_chat = ds.dataset(tmp_path / "chat" / "out").to_table()
    by_responses = ds.dataset(tmp_path / "responses" / "out").to_table()
    for column in ("categories", "summary"):
        assert by_responses.schema.field(column) == by_chat.schema.field(column)
        assert by_responses[column].equals(by_chat[column])
    assert pa.compute.min(by_responses["_prompt_tokens"]).as_py() > 0


def responses_line(custom_id: str, status: str = "completed", reason: str | None = None,
                   content: list | None = None, output: list | None = None) -> dict:
    body = {"status": status, "incomplete_details": {"reason": reason} if reason else None,
            "output": output if output is not None else [
                {"type": "reasoning", "summary": []},
                {"type": "message", "content": content}],
            "usage": {"input_tokens": 11, "output_tokens": 7}}
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": body},
            "error": None}


def test_responses_answers_refusals_and_cut_answers_are_told_apart(tmp_path):
    request = RequestConfig(endpoint="/v1/responses", model="m", user="{x}",
                            response_format=ResponseFormat(type="json_schema", schema=SCHEMA))
    answer = {"type": "output_text", "text": '{"tags": ["a"]}'}
    results = collected([
        responses_line("ok", content=[answer]),
        responses_line("refused", content=[{"type": "refusal", "refusal": "I can't help"}]),
        responses_line("cut", "incomplete", "max_output_tokens",
                       content=[{"type": "output_text", "text": '{"tags": ["a'}]),
        responses_line("nothing", output=[]),
        responses_line("in parts", output=[
            {"type": "message", "content": [{"type": "output_text", "text": '{"tags": '}]},
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "refusal", "refusal": "no"},
                                            {"type": "output_text", "text": '["b"]}'}]}]),
    ], request, tmp_path)
    ok, refused, cut, nothing, in_parts = results
    assert ok["_ok"] and ok["_value"] == {"tags": ["a"]} and ok["_prompt_tokens"] == 11
    assert ok["_completion_tokens"] == 7 and ok["_finish_reason"] == "stop"
    assert refused["_error"] == "the model gave no answer: I can't help"
    assert "cut at max_tokens" in cut["_error"] and cut["_retryable"]
    assert "no content" in nothing["_error"]
    assert in_parts["_ok"] and in_parts["_value"] == {"tags": ["b"]}, "parts are joined"


def test_an_embedding_of_the_wrong_length_is_an_error_of_its_row(tmp_path):
    request = RequestConfig(endpoint="/v1/embeddings", model="text-embedding-3-small",
                            input="{x}", dimensions=4)
    def line(custom_id: str, numbers: int) -> dict:
        vector = base64.b64encode(np.ones(numbers, dtype="<f4").tobytes()).decode()
        return {"custom_id": custom_id, "response": {"status_code": 200, "body": {
            "data": [{"embedding": vector}], "usage": {"prompt_tokens": 3}}}, "error": None}

    good, short = collected([line("good", 4), line("short", 3)], request, tmp_path)
    assert good["_ok"] and good["_value"] == {"embedding": [1.0] * 4}
    assert good["_completion_tokens"] == 0
    assert short["_error"] == "the embedding has 3 numbers, not 4" and short["_value"] is None


def test_request_lines_have_the_shape_of_their_endpoint():
    table = pa.table({"_key": ["a"], "_row": pa.array([0], pa.int64()), "x": ["hi \"you\""],
                      "img": ["https://example.com/a.png"]})
    responses = RequestConfig(
        endpoint="/v1/responses", model="m", system="Be brief.", max_tokens=50,
        user=[{"type": "text", "text": "{x}"}, {"type": "image_url", "column": "img"}],
        response_format=ResponseFormat(type="json_schema", schema=SCHEMA))
    body = json.loads(render_requests(table, responses, "t").requests[LINE][0].as_py())["body"]
    assert body["instructions"] == "Be brief." and body["max_output_tokens"] == 50
    assert body["text"]["format"] == {"type": "json_schema", "name": "answer", "strict": True,
                                      "schema": SCHEMA}
    assert body["input"] == [{"role": "user", "content": [
        {"type": "input_text", "text": 'hi "you"'},
        {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"}]}]
    embeddings = RequestConfig(endpoint="/v1/embeddings", model="text-embedding-3-large",
                               input="say {x}")
    body = json.loads(render_requests(table, embeddings, "t").requests[LINE][0].as_py())["body"]
    assert body == {"model": "text-embedding-3-large", "encoding_format": "base64",
                    "input": 'say hi "you"'}
    assert embeddings.vector_size == 3072


@pytest.mark.parametrize(("fields", "expected"), [
    ({"endpoint": "/v1/embeddings", "model": "text-embedding-3-small", "user": "{x}"},
     "user: not used by /v1/embeddings"),
    ({"endpoint": "/v1/embeddings", "model": "text-embedding-3-small"},
     "an embeddings request needs `input`"),
    ({"endpoint": "/v1/embeddings", "model": "my-embedder", "input": "{x}"},
     "set `dimensions`"),
    ({"endpoint": "/v1/embeddings", "model": "text-embedding-3-small", "input": "{x}",
      "dimensions": 2048}, "text-embedding-3-small gives at most 1,536, not 2,048"),
    ({"endpoint": "/v1/embeddings", "model": "text-embedding-ada-002", "input": "{x}",
      "dimensions": 512}, "text-embedding-ada-002 does not take it"),
    ({"model": "m", "input": "{x}"}, "input: only used by /v1/embeddings"),
    ({"model": "m"}, "`user` is required"),
    ({"endpoint": "/v1/responses", "model": "m", "user": "{x}", "seed": 1},
     "the Responses API does not take it"),
])
def test_a_request_that_does_not_fit_its_endpoint_is_refused(fields, expected):
    with pytest.raises(ValueError, match=expected.replace("`", ".").replace("(", ".")):
        RequestConfig(**fields)
