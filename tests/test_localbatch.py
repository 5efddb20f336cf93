"""The local Batch API server, driven over HTTP with the official SDK in strict mode."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jsonschema
import openai
import psutil
import pytest
from conftest import chat_line, free_port, read_jsonl, sdk_client, wait_until

from localbatch import HttpFault, LocalBatchServer, Simulation
from localbatch import store as store_module
from localbatch.chunks import WORKER_MIN_LINES, WORKERS, answer_lines
from localbatch.engines import MockEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "categories": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tone": {"type": "string", "enum": ["dark", "light"]},
    },
    "required": ["categories", "summary", "rating", "tone"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema",
                      "json_schema": {"name": "movie", "strict": True, "schema": SCHEMA}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                   "schema": schema}}


def upload(client, lines: list[str], name: str = "input.jsonl"):
    return client.files.create(file=(name, "\n".join(lines).encode()), purpose="batch")


def submit(client, lines: list[str], **kwargs):
    file = upload(client, lines)
    return client.batches.create(input_file_id=file.id, completion_window="24h",
                                 **{"endpoint": "/v1/chat/completions", **kwargs})


# files ----------------------------------------------------------------------------------

def test_files_upload_list_content_delete(start_localbatch):
    client = sdk_client(start_localbatch().base_url)
    created = [upload(client, [chat_line(f"r{i}", "hello")], f"f{i}.jsonl") for i in range(3)]
    assert created[0].bytes == len(chat_line("r0", "hello").encode())
    assert created[0].filename == "f0.jsonl" and created[0].purpose == "batch"

    page = client.files.list(limit=2, order="desc")
    assert [f.id for f in page.data] == [created[2].id, created[1].id]
    assert page.has_more
    rest = client.files.list(limit=2, order="desc", after=page.data[-1].id)
    assert [f.id for f in rest.data] == [created[0].id] and not rest.has_more

    assert client.files.content(created[1].id).text == chat_line("r1", "hello")
    assert client.files.delete(created[1].id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created[1].id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created[1].id)
    assert created[1].id not in [f.id for f in client.files.list().data]


def test_files_expire_as_openai_s_do(start_localbatch, monkeypatch):
    """Batch inputs and outputs live 30 days unless told otherwise; then 404, bytes gone."""
    server = start_localbatch()
    client = sdk_client(server.base_url)
    short = client.files.create(file=("a.jsonl", b"{}"), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 3600})
    assert short.expires_at == short.created_at + 3600
    batch = wait_until(client, submit(client, [chat_line("a", "x")]).id)
    (kept,) = [f for f in client.files.list() if f.id == batch.input_file_id]
    output = client.files.retrieve(batch.output_file_id)
    assert kept.expires_at == kept.created_at + 30 * 24 * 3600
    assert output.expires_at == output.created_at + 30 * 24 * 3600
    later = store_module.now() + 2 * 3600
    monkeypatch.setattr(store_module, "now", lambda: later)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(short.id)
    assert not server.store.file_path(short.id).exists()
    assert short.id not in {f.id for f in client.files.list()}
    assert client.files.content(batch.output_file_id).text  # 30 days are not over


def test_upload_rejects_wrong_name_and_oversized_files(start_localbatch):
    client = sdk_client(start_localbatch(Simulation(max_file_bytes=100)).base_url)
    with pytest.raises(openai.BadRequestError, match=r"\.jsonl"):
        client.files.create(file=("input.csv", b"a,b"), purpose="batch")
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", b"x" * 101), purpose="batch")
    assert info.value.status_code == 413
    assert info.value.response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("file", [
    b"{}",  # raw bytes: the SDK names them `upload` (bespokelabs-curator, openai-batch)
    io.BytesIO(b"{}"),  # an unnamed file object
    ("INPUT.JSONL", b"{}"),
])
def test_batch_uploads_are_accepted_as_openai_accepts_them(start_localbatch, file):
    client = sdk_client(start_localbatch().base_url)
    assert client.files.create(file=file, purpose="batch").bytes == 2
    with pytest.raises(openai.BadRequestError, match="must be a .jsonl file"):
        client.files.create(file=("notes.txt", b"{}"), purpose="batch")


def test_every_completion_has_its_own_id(start_localbatch):
    client = sdk_client(start_localbatch().base_url)
    ids = {client.chat.completions.create(model="gpt-4o-mini", messages=[
        {"role": "user", "content": "the same prompt"}]).id for _ in range(3)}
    assert len(ids) == 3


# the batch lifecycle --------------------------------------------------------------------

def test_batch_moves_through_every_state_with_counts_and_usage(start_localbatch):
    sim = Simulation(validating_seconds=0.4, requests_per_second=40, finalizing_seconds=0.4)
    client = sdk_client(start_localbatch(sim).base_url)
    lines = [chat_line(f"movie-{i}", f"A lonely robot {i} learns to paint sunsets",
                       response_format=JSON_SCHEMA_FORMAT) for i in range(20)]
    batch = submit(client, lines, metadata={"job": "movies", "shard": "0"})
    assert batch.status == "validating" and batch.metadata == {"job": "movies", "shard": "0"}
    assert batch.expires_at == batch.created_at + 86400

    seen, partial = set(), False
    while batch.status not in ("completed", "failed"):
        batch = client.batches.retrieve(batch.id)
        seen.add(batch.status)
        counts = batch.request_counts
        partial |= batch.status == "in_progress" and 0 < counts.completed < counts.total
        time.sleep(0.02)
    assert seen >= {"validating", "in_progress", "finalizing", "completed"}
    assert partial, "request_counts should move while the batch runs"
    assert batch.request_counts.model_dump() == {"total": 20, "completed": 20, "failed": 0}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.error_file_id is None and batch.model == "gpt-4o-mini"

    results = read_jsonl(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in results) == sorted(f"movie-{i}" for i in range(20))
    first = next(r for r in results if r["custom_id"] == "movie-3")
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    body = first["response"]["body"]
    assert body["system_fingerprint"] == "fp_localbatch_mock"
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert answer["categories"] == ["lonely", "robot", "learns"]
    assert answer["summary"] == "A lonely robot 3 learns to paint sunsets"
    assert answer["rating"] == 5 and answer["tone"] in ("dark", "light")
    assert batch.usage.input_tokens == sum(
        r["response"]["body"]["usage"]["prompt_tokens"] for r in results)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_a_token_rate_paces_the_batch(start_localbatch):
    client = sdk_client(start_localbatch(Simulation(tokens_per_second=400)).base_url)
    lines = [chat_line(f"r{i}", "word " * 36) for i in range(8)]  # 45 + 6 tokens each
    started = time.monotonic()
    batch = wait_until(client, submit(client, lines).id)
    assert batch.status == "completed" and batch.usage.input_tokens == 8 * 51
    assert time.monotonic() - started >= 0.9  # 408 tokens at 400 a second


def test_failed_requests_go_to_the_error_file(start_localbatch):
    client = sdk_client(start_localbatch(Simulation(request_failure_rate=1.0)).base_url)
    batch = wait_until(client, submit(client, [chat_line(f"r{i}", "x") for i in range(4)]).id)
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert batch.request_counts.failed == 4
    errors = read_jsonl(client, batch.error_file_id)
    assert {e["response"]["status_code"] for e in errors} == {500}
    assert errors[0]["response"]["body"]["error"]["type"] == "server_error"


def test_without_a_rate_the_oldest_running_batch_is_answered_first(start_localbatch):
    """One queue: a later batch gets no answer before the earlier one has all of its, so
    that a run collects its first batch while the others run, as at a provider."""
    client = sdk_client(start_localbatch(Simulation(chunk_size=20)).base_url)
    files = [upload(client, [chat_line(f"{name}{i}", f"text {i}") for i in range(3000)])
             for name in "ab"]
    first, second = (client.batches.create(input_file_id=file.id, completion_window="24h",
                                           endpoint="/v1/chat/completions") for file in files)
    first_partly_done = False
    while (later := client.batches.retrieve(second.id)).status != "completed":
        earlier = client.batches.retrieve(first.id).request_counts.completed
        if later.request_counts.completed:
            assert earlier == 3000, "the later batch was answered before the earlier one"
        first_partly_done |= 0 < earlier < 3000
        time.sleep(0.01)
    assert first_partly_done


def test_a_tick_that_answered_says_so_and_the_server_ticks_again_at_once(tmp_path):
    """The server's thread rests between ticks only when one answered nothing: a rest
    after each chunk held every batch up by a twentieth of a second a chunk."""
    server = LocalBatchServer(tmp_path / "data", simulation=Simulation(chunk_size=10))
    source = tmp_path / "in.jsonl"
    source.write_text("".join(chat_line(f"r{i}", f"text {i}") + "\n" for i in range(25)))
    file = server.store.add_file(source, "in.jsonl", "batch")
    batch = server.lifecycle.create(file["id"], "/v1/chat/completions", "24h", None, None)
    try:  # the server is not started: its thread does not tick, the test does
        ticks = [server.lifecycle.tick() for _ in range(6)]
        status = server.store.get_batch(batch["id"])["status"]
    finally:
        server.stop()
    # validate, three chunks of at most 10, finalize, complete
    assert ticks == [False, True, True, True, False, False]
    assert status == "completed"


def _chunk_workers(server: psutil.Process) -> list[psutil.Process]:
    return [p for p in server.children() if "localbatch.chunks" in " ".join(p.cmdline())]


def test_a_large_chunk_is_answered_in_worker_processes_as_it_is_in_place(tmp_path):
    """The mock engine's long chunks are answered in parts, each on a core of its own,
    off the GIL of the run that embeds the server; their answers are those given in
    place; a Ctrl-C meant for the run (the terminal signals its whole process
    group) does not end the workers, and the server's stop does."""
    lines = [chat_line(f"r{i}", f"A lonely robot {i} learns to paint sunsets",
                       response_format=JSON_SCHEMA_FORMAT) for i in range(2 * WORKER_MIN_LINES)]
    with LocalBatchServer(tmp_path) as server:
        client = sdk_client(server.base_url)
        batch = wait_until(client, submit(client, lines).id)
        workers = _chunk_workers(psutil.Process())
        assert len(workers) == min(2, WORKERS)
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        again = wait_until(client, submit(client, lines).id)
        assert [w.pid for w in _chunk_workers(psutil.Process())] == [w.pid for w in workers]
        results = read_jsonl(client, batch.output_file_id)
    assert not any(worker.is_running() for worker in workers)
    assert batch.status == again.status == "completed"
    in_place = [json.loads(line) for line in answer_lines(
        MockEngine(), [line.encode() for line in lines], [False] * len(lines), 500
    ).out.splitlines()]
    body = {r["custom_id"]: r["response"]["body"] for r in results}
    assert [body[r["custom_id"]]["choices"] for r in in_place] == [
        r["response"]["body"]["choices"] for r in in_place]
    assert batch.usage.input_tokens == sum(
        r["response"]["body"]["usage"]["prompt_tokens"] for r in in_place)


@pytest.mark.parametrize(("lines", "code", "line"), [
    (["not json", chat_line("a", "x")], "invalid_json_line", 1),
    ([json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"})],
     "missing_required_parameter", 1),
    ([chat_line("a", "x"), chat_line("a", "y")], "duplicate_custom_id", 2),
    ([chat_line("a", "x"), chat_line("b", "y").replace("/v1/chat/completions", "/v1/embeddings")],
     "url_mismatch", 2),
    ([chat_line("a", "x"), chat_line("b", "y", model="gpt-4o")], "model_mismatch", 2),
    ([chat_line("a", "x"), json.dumps({**json.loads(chat_line("b", "y")), "custom_id": {"k": 1}})],
     "invalid_custom_id", 2),
    ([""], "empty_file", None),
    ([chat_line(f"r{i}", "x") for i in range(4)], "too_many_tasks", None),
])
def test_validation_fails_the_batch_after_create(start_localbatch, lines, code, line):
    client = sdk_client(start_localbatch(Simulation(max_requests_per_batch=3)).base_url)
    batch = submit(client, lines)
    assert batch.status == "validating"
    batch = wait_until(client, batch.id)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors.data[0].code == code and batch.errors.data[0].line == line
    assert batch.output_file_id is None and batch.error_file_id is None


def test_enqueued_token_limit_counts_unfinished_batches(start_localbatch):
    sim = Simulation(enqueued_token_limits={"gpt-4o-mini": 100}, requests_per_second=1)
    client = sdk_client(start_localbatch(sim).base_url)
    text = "word " * 40  # about 56 tokens with the chat overhead
    first = wait_until(client, submit(client, [chat_line("a", text)]).id, {"in_progress"})
    second = wait_until(client, submit(client, [chat_line("b", text)]).id)
    assert second.status == "failed"
    error = second.errors.data[0]
    assert error.code == "token_limit_exceeded"
    assert "Enqueued token limit reached for gpt-4o-mini" in error.message
    assert "Limit: 100 enqueued tokens" in error.message
    assert wait_until(client, first.id).status == "completed"
    assert wait_until(client, submit(client, [chat_line("c", text)]).id).status == "completed"


def test_cancel_keeps_finished_results(start_localbatch):
    client = sdk_client(start_localbatch(Simulation(requests_per_second=20,
                                                    cancelling_seconds=0.3)).base_url)
    batch = submit(client, [chat_line(f"r{i}", "x") for i in range(200)])
    wait_until(client, batch.id, {"in_progress"})
    time.sleep(0.3)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait_until(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    done, failed = read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)
    assert 0 < len(done) < 200 and len(done) + len(failed) == 200
    assert {f["error"]["code"] for f in failed} == {"batch_cancelled"}
    assert all(f["response"] is None for f in failed)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status "
                                                     "'cancelled'"):
        client.with_options(max_retries=3).batches.cancel(batch.id)  # answered at once


def test_completion_window_expiry_keeps_partial_results(start_localbatch):
    sim = Simulation(requests_per_second=20, completion_window_seconds=1.0)
    client = sdk_client(start_localbatch(sim).base_url)
    batch = wait_until(client, submit(client, [chat_line(f"r{i}", "x") for i in range(100)]).id)
    assert batch.status == "expired" and batch.expired_at
    done, failed = read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)
    assert 0 < len(done) < 100 and len(done) + len(failed) == 100
    assert failed[0]["error"] == {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired."}
    assert batch.request_counts.completed == len(done)


def test_forced_expiry_hits_only_the_first_batches(start_localbatch):
    sim = Simulation(expire_batches=1, expire_after_requests=3)
    client = sdk_client(start_localbatch(sim).base_url)
    first = wait_until(client, submit(client, [chat_line(f"r{i}", "x") for i in range(10)]).id)
    second = wait_until(client, submit(client, [chat_line(f"r{i}", "x") for i in range(10)]).id)
    assert first.status == "expired" and first.request_counts.completed == 3
    assert second.status == "completed" and second.request_counts.completed == 10


def test_batch_list_is_newest_first_and_paginates(start_localbatch):
    client = sdk_client(start_localbatch().base_url)
    ids = [submit(client, [chat_line("a", "x")]).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
    assert [b.id for b in page.get_next_page().data] == [ids[0]]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_unknown")


def test_a_list_after_an_unknown_id_is_404_not_the_first_page_again(start_localbatch):
    """Restarting at the first page would make an auto-paginating client loop for ever."""
    client = sdk_client(start_localbatch().base_url)
    submit(client, [chat_line("a", "x")])
    with pytest.raises(openai.NotFoundError, match="batch_unknown"):
        client.batches.list(after="batch_unknown")
    with pytest.raises(openai.NotFoundError, match="file-unknown"):
        client.files.list(after="file-unknown")


@pytest.mark.parametrize(("extra", "param"), [
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"temperature": 0}, "temperature"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": "3600"}}, "seconds"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "seconds"),
    ({"output_expires_after": {"anchor": "expires_at", "seconds": 3600}}, "anchor"),
    ({"output_expires_after": {"seconds": 3600}}, "anchor"),
])
def test_create_refuses_a_body_openai_refuses(start_localbatch, extra, param):
    """A string `seconds` once made a batch that never left `finalizing`."""
    client = sdk_client(start_localbatch().base_url, max_retries=0)
    file = upload(client, [chat_line("a", "x")])
    with pytest.raises(openai.BadRequestError, match=param):
        client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                              completion_window="24h", extra_body=extra)
    assert client.batches.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")


def test_empty_metadata_comes_back_empty_and_output_expiry_is_taken(start_localbatch):
    client = sdk_client(start_localbatch().base_url)
    batch = submit(client, [chat_line("a", "x")], metadata={},
                   extra_body={"output_expires_after": {"anchor": "created_at",
                                                        "seconds": 3600}})
    assert batch.metadata == {}
    done = wait_until(client, batch.id)
    assert done.status == "completed"
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 3600


def test_models_are_listed(start_localbatch):
    client = sdk_client(start_localbatch().base_url)
    assert {"gpt-4o-mini", "text-embedding-3-small"} <= {m.id for m in client.models.list()}
    assert client.models.retrieve("gpt-4o-mini").owned_by == "localbatch"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.models.retrieve("no-such-model")


def test_an_unknown_model_is_a_404_of_its_request_as_at_openai(start_localbatch):
    """A typo in a model name is refused per request (model_not_found), not answered;
    a dated snapshot of a known model and the simulation's own models are answered."""
    client = sdk_client(start_localbatch(Simulation(models=["my-fine-tune"])).base_url)
    lines = [chat_line("typo", "hi", model="gpt-4o-mnii")]
    upload = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = wait_until(client, client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.failed == 1
    (error,) = read_jsonl(client, batch.error_file_id)
    assert error["custom_id"] == "typo" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o-mnii",
                                       messages=[{"role": "user", "content": "hi"}])
    for model in ("gpt-4o-mini-2024-07-18", "my-fine-tune"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert client.models.retrieve(model).id == model


# auth, faults, engines ------------------------------------------------------------------

def test_wrong_api_key_is_401(start_localbatch):
    server = start_localbatch(api_key="sk-right")
    with pytest.raises(openai.AuthenticationError) as info:
        sdk_client(server.base_url, api_key="sk-wrong").batches.list()
    assert info.value.code == "invalid_api_key"
    assert sdk_client(server.base_url, api_key="sk-right").batches.list().data == []


def test_injected_429_is_retried_by_the_sdk_and_visible_without_retries(start_localbatch):
    fault = HttpFault(path="/v1/batches", method="GET", status=429, rate=1.0, retry_after=0,
                      times=1)
    server = start_localbatch(Simulation(http_faults=[fault]))
    assert sdk_client(server.base_url, max_retries=2).batches.list().data == []
    fault = HttpFault(path="/v1/files", status=500, rate=1.0)
    server = start_localbatch(Simulation(http_faults=[fault]))
    with pytest.raises(openai.InternalServerError):
        sdk_client(server.base_url, max_retries=0).files.list()


def test_sync_chat_and_embeddings(start_localbatch):
    client = sdk_client(start_localbatch().base_url)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Tell me about owls"}])
    assert reply.choices[0].message.content == "Mock answer: Tell me about owls"
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"],
                                       dimensions=8, encoding_format="float")
    assert [len(d.embedding) for d in vectors.data] == [8, 8]
    assert abs(sum(v * v for v in vectors.data[0].embedding) - 1) < 1e-6
    again = client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=8,
                                      encoding_format="float")
    assert again.data[0].embedding == vectors.data[0].embedding
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="gpt-4o-mini", messages=[])


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tags", "summary"],
          "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                         "summary": {"type": "string"}}}


def test_sync_responses_completions_and_moderations_are_shaped_as_the_sdk_types(
        start_localbatch):
    """The SDK validates every field strictly: what third-party clients parse is there."""
    client = sdk_client(start_localbatch().base_url)
    text = client.responses.create(model="gpt-4o-mini", instructions="Be brief.",
                                   input="Tell me about owls")
    assert text.output_text == "Mock answer: Tell me about owls" and text.status == "completed"
    assert text.usage.input_tokens > 0 and text.usage.output_tokens > 0
    typed = client.responses.create(
        model="gpt-4o-mini", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Night hunting owls of the northern forests"}]}],
        text={"format": {"type": "json_schema", "name": "tags", "schema": SCHEMA,
                         "strict": True}})
    assert set(json.loads(typed.output_text)) == {"tags", "summary"}
    cut = client.responses.create(model="gpt-4o-mini", input="one two three four five six",
                                  max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Owls at")
    assert completion.choices[0].text == "Mock answer: Owls at"
    moderation = client.moderations.create(input=["a quiet owl", "attack the village"])
    assert [r.flagged for r in moderation.results] == [False, True]
    assert moderation.results[1].categories.violence
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=None)


@pytest.mark.parametrize(("url", "body", "read"), [
    ("/v1/responses", {"input": "hello owls"},
     lambda b: b["output"][0]["content"][0]["text"]),
    ("/v1/completions", {"prompt": "hello owls"}, lambda b: b["choices"][0]["text"]),
    ("/v1/moderations", {"input": "hello owls"}, lambda b: str(b["results"][0]["flagged"])),
])
def test_every_batch_endpoint_is_served_in_batches(start_localbatch, url, body, read):
    """batchor's default /v1/responses once ended 0 of 20: every line failed."""
    client = sdk_client(start_localbatch().base_url)
    line = json.dumps({"custom_id": "r1", "method": "POST", "url": url,
                       "body": {"model": "gpt-4o-mini", **body}})
    file = upload(client, [line])
    batch = wait_until(client, client.batches.create(
        input_file_id=file.id, endpoint=url, completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    (result,) = read_jsonl(client, batch.output_file_id)
    assert result["response"]["status_code"] == 200
    assert read(result["response"]["body"]) in ("Mock answer: hello owls", "False")


def test_forward_engine_uses_an_upstream_server(start_localbatch):
    upstream = start_localbatch(api_key="sk-upstream",
                                simulation=Simulation(http_faults=[HttpFault(
                                    path="/v1/chat", status=503, rate=1.0, times=2,
                                    retry_after=0)]))
    front = start_localbatch(engine="forward", upstream_url=upstream.base_url,
                             upstream_api_key="sk-upstream")
    client = sdk_client(front.base_url)
    batch = wait_until(client, submit(client, [chat_line(f"r{i}", f"owl {i}")
                                               for i in range(5)]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 5
    contents = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
                for r in read_jsonl(client, batch.output_file_id)}
    assert contents["r2"] == "Mock answer: owl 2"

    unreachable = start_localbatch(engine="forward", upstream_url=upstream.base_url,
                                   upstream_api_key="sk-wrong")
    client = sdk_client(unreachable.base_url)
    batch = wait_until(client, submit(client, [chat_line("r0", "x")]).id)
    assert batch.request_counts.failed == 1
    assert read_jsonl(client, batch.error_file_id)[0]["response"]["status_code"] == 401


# durability -----------------------------------------------------------------------------

def _serve(data_dir, port, config) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "enrichflow.cli", "serve", "--port", str(port),
         "--data-dir", str(data_dir), "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("enrichflow serve did not start")


def test_killed_server_resumes_its_batches(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("requests_per_second: 50\nchunk_size: 10\n")
    port = free_port()
    server = _serve(tmp_path / "data", port, config)
    try:
        client = sdk_client(f"http://127.0.0.1:{port}/v1", max_retries=0)
        batch = submit(client, [chat_line(f"r{i}", f"text {i}") for i in range(150)])
        deadline = time.monotonic() + 20
        while client.batches.retrieve(batch.id).request_counts.completed < 30:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        server = _serve(tmp_path / "data", port, config)
        batch = wait_until(client, batch.id, timeout=30)
        assert batch.status == "completed"
        results = read_jsonl(client, batch.output_file_id)
        assert sorted(r["custom_id"] for r in results) == sorted(f"r{i}" for i in range(150))
        assert batch.request_counts.completed == 150
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)


def test_a_killed_server_s_chunk_worker_ends_with_it(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("seed: 1\n")
    port = free_port()
    server = _serve(tmp_path / "data", port, config)
    client = sdk_client(f"http://127.0.0.1:{port}/v1", max_retries=0)
    try:
        wait_until(client, submit(client, [chat_line(f"r{i}", f"text {i}")
                                           for i in range(WORKER_MIN_LINES)]).id)
        (worker,) = _chunk_workers(psutil.Process(server.pid))
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        worker.wait(timeout=10)  # psutil.TimeoutExpired: it outlived its server
    finally:
        server.kill()


@pytest.mark.parametrize(("body", "message"), [
    ({"response_format": "json"},
     "Invalid type for 'response_format': expected an object, but got str instead."),
    ({"max_tokens": "10"},
     "Invalid type for 'max_tokens': expected an integer, but got str instead."),
    ({"response_format": schema_format({"$defs": {"a": {"$ref": "#/$defs/a"}},
                                        "$ref": "#/$defs/a"})},
     "Invalid schema for response_format: $ref '#/$defs/a' leads back to itself, never to "
     "a schema"),
    ({"response_format": schema_format({
        "type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"],
        "additionalProperties": False})},
     "Invalid schema for response_format: it nests more than 10 levels deep (a $ref to an "
     "enclosing schema that is required, with no null or empty-array way out?)"),
])
def test_a_bad_line_fails_that_line_never_the_batch(start_localbatch, body, message):
    """Such a line kept its batch in_progress at 0 until the window ended."""
    server = start_localbatch()
    client = sdk_client(server.base_url)
    batch = wait_until(client, submit(client, [chat_line("bad", "x", **body),
                                               chat_line("good", "y")]).id)
    assert batch.status == "completed"
    assert batch.request_counts.completed == 1 and batch.request_counts.failed == 1
    (failed,) = read_jsonl(client, batch.error_file_id)
    assert failed["custom_id"] == "bad" and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["message"] == message
    # the synchronous route answers the same, an OpenAI 400, not a plain-text 500
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": "hi"}], **body)


def test_a_null_text_part_fails_its_line_never_the_batch(start_localbatch):
    """It failed the whole batch at validation, counting its tokens."""
    client = sdk_client(start_localbatch().base_url)
    messages = [{"role": "user", "content": [{"type": "text", "text": None}]}]
    batch = wait_until(client, submit(client, [chat_line("bad", "x", messages=messages),
                                               chat_line("good", "y")]).id)
    assert batch.status == "completed" and batch.request_counts.failed == 1
    (failed,) = read_jsonl(client, batch.error_file_id)
    message = ("Invalid type for 'messages[0].content[0].text': expected a string, but got "
               "null instead.")
    assert failed["custom_id"] == "bad" and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["message"] == message
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)


def test_embeddings_take_openai_s_four_input_forms_and_its_dimension_bounds(start_localbatch):
    """Token ids are one input (they were one vector per token, and failed the batch);
    each model's own bound on `dimensions`; ada-002 takes none."""
    client = sdk_client(start_localbatch().base_url)
    model = "text-embedding-3-small"
    for value, vectors, tokens in (("a b", 1, 1), (["a", "b"], 2, 2), ([1, 2, 3], 1, 3),
                                   ([[1, 2], [3]], 2, 3)):
        answer = client.embeddings.create(model=model, input=value, dimensions=4,
                                          encoding_format="float")
        assert (len(answer.data), answer.usage.prompt_tokens) == (vectors, tokens), value
    line = json.dumps({"custom_id": "ids", "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": model, "input": [5, 6, 7], "dimensions": 4}})
    batch = wait_until(client, submit(client, [line], endpoint="/v1/embeddings").id)
    (done,) = read_jsonl(client, batch.output_file_id)
    assert batch.status == "completed" and len(done["response"]["body"]["data"]) == 1
    floats = {"input": "x", "encoding_format": "float"}
    assert client.embeddings.create(model="text-embedding-3-large", dimensions=3072, **floats)
    with pytest.raises(openai.BadRequestError, match="it must be from 1 to 1536"):
        client.embeddings.create(model=model, dimensions=2048, **floats)
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        client.embeddings.create(model="text-embedding-ada-002", dimensions=8, **floats)


def test_a_recursive_schema_with_a_way_out_gets_a_finite_answer_that_fits(start_localbatch):
    """OpenAI's own recursive examples: a tree (`$ref: "#"`) and a linked list whose
    next node may be null."""
    tree = {"type": "object", "additionalProperties": False, "required": ["name", "children"],
            "properties": {"name": {"type": "string"},
                           "children": {"type": "array", "items": {"$ref": "#"}}}}
    chain = {"$defs": {"node": {
        "type": "object", "additionalProperties": False, "required": ["value", "next"],
        "properties": {"value": {"type": "integer"},
                       "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}},
        "$ref": "#/$defs/node"}
    client = sdk_client(start_localbatch().base_url)
    for schema in (tree, chain):
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}],
            response_format=schema_format(schema)).choices[0].message.content
        jsonschema.validate(json.loads(answer), schema)


def test_a_batch_whose_step_fails_ends_failed_and_frees_its_tokens(start_localbatch):
    """Whatever goes wrong while a batch moves on, it reaches a terminal state."""
    server = start_localbatch()
    client = sdk_client(server.base_url)
    uploaded = client.files.create(file=("in.jsonl", chat_line("a", "x").encode()),
                                   purpose="batch")
    server.store.file_path(uploaded.id).unlink()  # its input is gone from disk
    batch = wait_until(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions",
        completion_window="24h").id)
    assert batch.status == "failed" and batch.errors.data[0].code == "server_error"
    assert "localbatch could not process this batch" in batch.errors.data[0].message


@pytest.mark.parametrize("ending", ["completed", "cancelled", "expired"])
def test_a_batch_that_cannot_end_as_it_should_ends_failed(start_localbatch, monkeypatch,
                                                          ending):
    """An error while a batch finalizes, cancels or expires (here: its output cannot be
    published) ends it failed with an error the client reads, never stuck, and its
    enqueued tokens are free for the next batch."""
    server = start_localbatch(Simulation(
        requests_per_second=2 if ending == "cancelled" else None,
        expire_batches=1 if ending == "expired" else 0, expire_after_requests=1,
        enqueued_token_limits={"gpt-4o-mini": 250}))  # 4 + 1 requests of 51 tokens pass it
    client = sdk_client(server.base_url)
    publish = server.store.add_file

    def broken(path, filename, purpose, ttl=None):
        if purpose == "batch_output":
            raise OSError("disk full")
        return publish(path, filename, purpose, ttl)

    monkeypatch.setattr(server.store, "add_file", broken)
    batch = submit(client, [chat_line(f"r{i}", "word " * 36) for i in range(4)])
    if ending == "cancelled":
        wait_until(client, batch.id, {"in_progress"})
        client.batches.cancel(batch.id)
    batch = wait_until(client, batch.id)
    assert batch.status == "failed" and batch.errors.data[0].code == "server_error"
    assert "disk full" in batch.errors.data[0].message
    monkeypatch.setattr(server.store, "add_file", publish)
    following = wait_until(client, submit(client, [chat_line("next", "word " * 36)]).id)
    assert following.status == "completed", "the failed batch's tokens are free"


def announced_upload(server, size: int, head: bytes = b"") -> tuple[int, str]:
    """(status, error message) of an upload that announces `size` bytes but sends only
    `head`: an answer at all proves the server did not wait to read the body."""
    host, port = server.base_url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/v1/files")
    connection.putheader("Authorization", "Bearer test-key")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(size))
    connection.endheaders(head or None)
    response = connection.getresponse()
    return response.status, json.loads(response.read())["error"]["message"]


def test_sizes_are_refused_before_the_body_is_read(start_localbatch):
    server = start_localbatch()
    status, message = announced_upload(server, 600 * 1024 * 1024)
    assert status == 413 and "a file may be at most 536,870,912 bytes" in message
    with pytest.raises(openai.BadRequestError, match="'dimensions'"):
        sdk_client(server.base_url).embeddings.create(model="text-embedding-3-small",
                                                      input="x", dimensions=5_000_000)


def test_a_batch_upload_too_large_is_refused_from_its_first_bytes(start_localbatch):
    """The purpose comes before the file in the form: a batch input over the limit is
    refused before its bytes are read (and spooled to disk); other purposes go through."""
    server = start_localbatch(Simulation(max_file_bytes=100))
    status, message = announced_upload(
        server, 50 * 1024 * 1024,
        b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--x\r\n'
        b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n')
    assert status == 413 and "a batch input may be at most 100 bytes" in message

    client = sdk_client(server.base_url)
    data = b"y" * (2 * 1024 * 1024)
    kept = client.files.create(file=("notes.bin", data), purpose="user_data")
    assert kept.bytes == len(data) and client.files.content(kept.id).content == data
