"""localbatch's Anthropic face: Message Batches and Messages, through the official
`anthropic` SDK, unchanged, with its strict response validation."""

from __future__ import annotations

import base64
import io
import json
import time

import anthropic
import pytest
from PIL import Image

from localbatch import Simulation

KEY = "sk-ant-test"
SCHEMA = {"type": "object", "properties": {"categories": {"type": "array",
                                                          "items": {"type": "string"}},
                                           "summary": {"type": "string"}},
          "required": ["categories", "summary"], "additionalProperties": False}


def claude(server, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key=key,
                               _strict_response_validation=True, max_retries=0)


def params(text: str, **extra) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 200,
            "messages": [{"role": "user", "content": text}], **extra}


def ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"{batch_id} still {batch.processing_status}"
        time.sleep(0.05)
    return batch


def test_a_message_batch_runs_and_streams_typed_results(start_localbatch):
    client = claude(start_localbatch(api_key=KEY))
    tool = {"name": "record", "description": "record the movie", "input_schema": SCHEMA}
    batch = client.messages.batches.create(requests=[
        {"custom_id": "text", "params": params("Say hello to the heist crew")},
        {"custom_id": "structured", "params": params(
            "Categorise: a heist in Lisbon",
            output_config={"format": {"type": "json_schema", "schema": SCHEMA}})},
        {"custom_id": "tool", "params": params(
            "Categorise: a love story", tools=[tool],
            tool_choice={"type": "tool", "name": "record"})},
        {"custom_id": "no-model", "params": {"max_tokens": 10, "messages": [
            {"role": "user", "content": "hi"}]}},
    ])
    assert batch.id.startswith("msgbatch_") and batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 4 and batch.results_url is None

    done = ended(client, batch.id)
    assert done.request_counts.model_dump() == {"processing": 0, "succeeded": 3, "errored": 1,
                                                "canceled": 0, "expired": 0}
    assert done.ended_at and done.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")
    found = {line.custom_id: line.result for line in client.messages.batches.results(batch.id)}
    assert found["text"].type == "succeeded"
    assert found["text"].message.content[0].text.startswith("Mock answer")
    assert found["text"].message.usage.input_tokens > 0
    answer = json.loads(found["structured"].message.content[0].text)
    assert set(answer) == {"categories", "summary"}
    (use,) = found["tool"].message.content
    assert use.type == "tool_use" and use.name == "record" and set(use.input) == set(answer)
    assert found["tool"].message.stop_reason == "tool_use"
    assert found["no-model"].type == "errored"
    assert found["no-model"].error.error.type == "invalid_request_error"

    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_batches_are_listed_newest_first_page_by_page(start_localbatch):
    client = claude(start_localbatch(api_key=KEY))
    made = [client.messages.batches.create(
        requests=[{"custom_id": "a", "params": params(f"n{i}")}]).id for i in range(5)]
    first = client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    assert [b.id for b in client.messages.batches.list(limit=2)] == made[::-1]  # every page


def test_a_cancel_ends_the_batch_with_the_rest_canceled(start_localbatch):
    client = claude(start_localbatch(Simulation(requests_per_second=2, chunk_size=1),
                                     api_key=KEY))
    batch = client.messages.batches.create(requests=[
        {"custom_id": f"r{i}", "params": params(f"row {i}")} for i in range(20)])
    time.sleep(1)
    assert client.messages.batches.cancel(batch.id).processing_status in ("canceling", "ended")
    done = ended(client, batch.id)
    counts = done.request_counts
    assert counts.canceled > 0 and counts.succeeded + counts.canceled == 20
    assert done.cancel_initiated_at is not None
    kinds = {line.result.type for line in client.messages.batches.results(batch.id)}
    assert kinds <= {"succeeded", "canceled"} and "canceled" in kinds


def test_messages_answer_at_once_with_images_and_refuse_a_wrong_key(start_localbatch):
    server = start_localbatch(api_key=KEY)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(buffer.getvalue()).decode()}}
    answer = claude(server).messages.create(
        model="claude-sonnet-4-6", max_tokens=50, system="Caption it.",
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "a chair"}]}])
    assert answer.content[0].type == "text" and answer.stop_reason == "end_turn"
    with pytest.raises(anthropic.NotFoundError, match="claude-nope"):
        claude(server).messages.create(model="claude-nope", max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError):
        claude(server, "sk-ant-wrong").messages.batches.list()
