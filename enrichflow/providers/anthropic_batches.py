"""Anthropic's Message Batches through the `anthropic` SDK.

The job's requests are rendered as OpenAI chat requests, like every job's; each is
translated here into Messages API params (`message_params`) and each result back into an
OpenAI batch output line (`output_line`), so collect reads them as it reads OpenAI's.

A Message Batch holds its requests in the create call itself and carries no metadata.
So `upload` keeps a shard's requests in the output's `_state/` until its batch exists,
creates go one at a time, and a run killed between the create call and its journal write
finds the batch by what the API shows: created after the call was journaled (less clock
slack), not journaled by the run, holding as many requests as the shard. An ended one is
checked by the custom ids of its results; of those still running, a single one is taken
(it cannot be checked before it ends), and two or more stop the run, saying so, until
they end: nothing is sent twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import pyarrow as pa
from anthropic.types import Message
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from openai.types import Batch

from enrichflow.errors import ConfigError, ProviderError
from enrichflow.providers import JOB_ERRORS, SLACK_SECONDS, BatchAPI, Intent
from enrichflow.storage import Location

ERRORS = (anthropic.APIError,)  # what a call raises (`tasks.api.sdk_errors`)
TRANSIENT = (anthropic.APIConnectionError, anthropic.RateLimitError,
             anthropic.InternalServerError, anthropic.ConflictError)
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; a job that sets none gets this
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
STASH = "_state/anthropic"  # a shard's requests between upload and create
# Models without structured outputs answer a schema through a forced tool.
TOOL_MODELS = re.compile(r"^claude-(3|instant|2)")
ANSWER_TOOL = "answer"
FINISH_REASONS = {"max_tokens": "length", "refusal": "content_filter",
                  "model_context_window_exceeded": "length"}  # else "stop"
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                "rate_limit_error": 429, "api_error": 500, "overloaded_error": 529}
GONE = {"canceled": "batch_cancelled", "expired": "batch_expired"}  # collect's codes


class AnthropicBatches(BatchAPI):
    kind = "anthropic"
    transient = TRANSIENT
    tags_batches = False

    def __init__(self, client: anthropic.Anthropic, stash: Location):
        self.client, self.stash = client, stash
        self.base_url = str(client.base_url)

    def check_model(self, model: str) -> None:
        """Anthropic's models endpoint lists its models; one it does not know is refused."""
        try:
            self.client.models.retrieve(model)
        except anthropic.NotFoundError as exc:
            names = [m.id for m in self.client.models.list(limit=1000)]
            if names and model not in names:
                raise ConfigError(f"request.model: {self.base_url} has no model {model!r} "
                                  f"(it has {', '.join(names[:8])}). Nothing was sent") from exc

    def upload(self, filename: str, payload: bytes, orphans_since: float | None = None
               ) -> str:
        name = f"{STASH}/{filename}"
        self.stash.write_bytes(name, payload)
        return name

    def create(self, upload_id: str, endpoint: str, metadata: dict[str, str]) -> Batch:
        if not self.stash.exists(upload_id):
            raise ProviderError(f"{self.stash.path(upload_id)}, the requests of a batch about "
                                "to be created, is gone; run the job with --force to send "
                                "again what has no answer")
        with self.stash.open(upload_id) as lines:
            requests = [{"custom_id": wire_id(line["custom_id"]),
                         "params": message_params(line["body"])}
                        for line in map(json.loads, lines) if line]
        batch = self.client.with_options(max_retries=0).messages.batches.create(
            requests=requests)
        self.stash.remove(upload_id)
        return as_batch(batch)

    def find(self, intent: Intent) -> Batch | None:
        candidates = []
        for batch in self.client.messages.batches.list(limit=100):
            if batch.created_at.timestamp() < intent.since - SLACK_SECONDS:
                break  # newest first
            if batch.id not in intent.known and _total(batch) == intent.requests:
                candidates.append(batch)
        wire_ids = {wire_id(c) for c in intent.custom_ids()} if candidates else set()
        running = []
        for batch in candidates:
            if batch.processing_status != "ended":
                running.append(batch)
                continue
            first = next(iter(self.client.messages.batches.results(batch.id)), None)
            if first is not None and first.custom_id in wire_ids:
                return as_batch(batch)
        if len(running) <= 1:  # one still running cannot be checked before it ends
            return as_batch(running[0]) if running else None
        raise ProviderError(f"batches {', '.join(b.id for b in running)} could each be the one "
                            "created for this shard before the run was stopped (Message "
                            "Batches carry no metadata); which one shows in their results "
                            "once they end: run the job again then. Nothing was sent twice")

    def look(self, batch_ids: list[str]) -> list[Batch]:
        wanted = set(batch_ids)
        listed = {b.id: b for b in self.client.messages.batches.list(limit=100).data
                  if b.id in wanted}
        return [as_batch(listed.get(batch_id)
                         or self.client.messages.batches.retrieve(batch_id))
                for batch_id in batch_ids]

    def cancel(self, batch_id: str) -> bool:
        try:
            batch = self.client.messages.batches.cancel(batch_id)
        except anthropic.BadRequestError:
            return False
        return batch.processing_status != "ended"

    @contextmanager
    def result_files(self, batch: Batch, custom_ids: pa.Array) -> Iterator[list[str]]:
        """The results stream into one file of OpenAI output and error lines, under the
        custom ids the rows have (an id Anthropic would refuse went up hashed)."""
        ours = {wire_id(c): c for c in custom_ids.to_pylist() if not CUSTOM_ID.match(c)}
        handle, path = tempfile.mkstemp(suffix=".jsonl")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                for result in self.client.messages.batches.results(batch.id):
                    out.write(json.dumps(output_line(result, ours)) + "\n")
            yield [path]
        finally:
            os.remove(path)

    def results_kept(self, batch: Batch) -> bool:
        try:
            return self.client.messages.batches.retrieve(batch.id).results_url is not None
        except anthropic.NotFoundError:
            return False

    def clean_up(self, batch: Batch) -> None:
        try:
            self.client.messages.batches.delete(batch.id)
        except anthropic.NotFoundError:
            pass

    def answer_now(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            message = self.client.post("/v1/messages", body=message_params(body),
                                       cast_to=Message)
        except anthropic.APIStatusError as exc:
            if exc.status_code in JOB_ERRORS:
                raise
            error = (exc.body or {}).get("error") if isinstance(exc.body, dict) else None
            return exc.status_code, {"error": {"message": (error or {}).get("message")
                                                          or exc.message}}
        return 200, chat_completion(message.model_dump())


def wire_id(custom_id: str) -> str:
    """A custom id as Anthropic takes it (64 letters, digits, _ and -): as it is if it
    fits, else a hash of it."""
    if CUSTOM_ID.match(custom_id):
        return custom_id
    return "h-" + hashlib.blake2b(custom_id.encode(), digest_size=24).hexdigest()


def message_params(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request (as the job renders it) as Messages API params: the system
    message apart, images as base64 or URL blocks, the answer's JSON schema as structured
    output (a forced tool for models without it), `extra` settings passed on as they are."""
    body = dict(body)
    model = body.pop("model")
    params: dict[str, Any] = {"model": model, "messages": []}
    for message in body.pop("messages"):
        if message["role"] in ("system", "developer"):
            params["system"] = _text(message["content"])
        else:
            content = message["content"]
            if isinstance(content, list):
                content = [_block(part) for part in content]
            params["messages"].append({"role": message["role"], "content": content})
    ceilings = body.pop("max_completion_tokens", None), body.pop("max_tokens", None)
    params["max_tokens"] = next(filter(None, ceilings), DEFAULT_MAX_TOKENS)
    body.pop("seed", None)  # Anthropic has none
    response_format = body.pop("response_format", None) or {}
    if response_format.get("type") == "json_schema":
        schema = response_format["json_schema"]["schema"]
        if TOOL_MODELS.match(model):
            params["tools"] = [{"name": ANSWER_TOOL, "description": "Give the answer.",
                                "input_schema": schema}]
            params["tool_choice"] = {"type": "tool", "name": ANSWER_TOOL}
        else:
            params["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    return {**params, **body}  # temperature, top_p and the job's `extra`


def chat_completion(message: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Message as the body of an OpenAI chat completion: its text (a forced
    tool's input as JSON), its stop reason as a finish reason, its usage."""
    texts = [json.dumps(block["input"]) if block["type"] == "tool_use" else block["text"]
             for block in message.get("content") or [] if block["type"] in ("text", "tool_use")]
    usage = message.get("usage") or {}
    prompt = sum(usage.get(name) or 0 for name in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    reason = FINISH_REASONS.get(message.get("stop_reason"), "stop")
    return {"id": message.get("id"), "object": "chat.completion", "model": message.get("model"),
            "choices": [{"index": 0, "finish_reason": reason, "message": {
                "role": "assistant", "content": "".join(texts) if texts else None,
                "refusal": "the model refused" if reason == "content_filter" else None}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens", 0),
                      "total_tokens": prompt + (usage.get("output_tokens") or 0)}}


def output_line(result: MessageBatchIndividualResponse, ours: dict[str, str]
                ) -> dict[str, Any]:
    """A Message Batch result as an OpenAI batch output or error line."""
    custom_id = ours.get(result.custom_id, result.custom_id)
    outcome = result.result
    if outcome.type == "succeeded":
        return {"custom_id": custom_id, "response": {
            "status_code": 200, "body": chat_completion(outcome.message.model_dump())}}
    if outcome.type in GONE:
        return {"custom_id": custom_id, "response": None, "error": {
            "code": GONE[outcome.type], "message": f"the request was {outcome.type} before "
                                                   "it was processed"}}
    error = outcome.error.error
    return {"custom_id": custom_id, "response": {
        "status_code": ERROR_STATUS.get(error.type, 500),
        "body": {"error": {"message": f"{error.type}: {error.message}"}}}}


def as_batch(batch: MessageBatch) -> Batch:
    """A Message Batch as the flow sees every batch: OpenAI's Batch model."""
    counts = batch.request_counts
    if batch.processing_status == "ended":
        status = ("cancelled" if batch.cancel_initiated_at else
                  "expired" if counts.expired else "completed")
    else:
        status = "cancelling" if batch.processing_status == "canceling" else "in_progress"
    return Batch(id=batch.id, object="batch", endpoint="/v1/messages", status=status,
                 input_file_id="", completion_window="24h",
                 created_at=int(batch.created_at.timestamp()),
                 expires_at=int(batch.expires_at.timestamp()),
                 request_counts={"total": _total(batch), "completed": counts.succeeded,
                                 "failed": counts.errored + counts.canceled + counts.expired})


def _total(batch: MessageBatch) -> int:
    counts = batch.request_counts
    return (counts.processing + counts.succeeded + counts.errored + counts.canceled
            + counts.expired)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content)


def _block(part: dict[str, Any]) -> dict[str, Any]:
    """A chat content part as a Messages content block."""
    if part.get("type") != "image_url":
        return part
    url = part["image_url"]["url"]
    if url.startswith("data:"):
        media_type, _, data = url.removeprefix("data:").partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}

