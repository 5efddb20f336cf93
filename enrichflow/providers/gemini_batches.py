"""Gemini's Batch Mode through Google's `google-genai` SDK (the Gemini Developer API).

The job's requests are rendered as OpenAI chat requests, like every job's; `upload`
translates a shard's into Gemini's `{key, request}` lines (`content_request`) and puts
them up through the Files API, and each result line comes back as an OpenAI batch output
line (`output_line`), so collect reads them as it reads OpenAI's. A batch carries its
shard's metadata in its display name, by which a run killed between the create call and
its journal write finds it again by listing. Gemini names the model at create, not in
the file: the upload's id carries it (`files/ID@MODEL`), so a create after a crash
needs nothing the run has lost. Gemini shows no per-request progress (a batch has no
request counts), and a job still PENDING is OpenAI's `validating`: not started.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import httpx2
import pyarrow as pa
from google import genai
from google.genai import errors, types
from openai.types import Batch
from prefect import get_run_logger

from enrichflow.providers import JOB_ERRORS, SLACK_SECONDS, BatchAPI, Intent, unknown_model

# The SDK retries itself what was not done (408, 429: `client`), at create too; a 5xx or
# a lost connection is ours to retry, except at create (see submit).
CONNECTION_ERRORS = (httpx.TransportError, httpx2.TransportError)  # its HTTP clients' own
ERRORS = (errors.APIError, *CONNECTION_ERRORS)  # what a call raises (`tasks.api.sdk_errors`)
TRANSIENT = (errors.ServerError, *CONNECTION_ERRORS)
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
NAME_PREFIX = "enrichflow "  # a display name that carries metadata starts so
PAGE_SIZE = 100
STATUSES = {"JOB_STATE_PENDING": "validating", "JOB_STATE_QUEUED": "validating",
            "JOB_STATE_RUNNING": "in_progress", "JOB_STATE_PAUSED": "in_progress",
            "JOB_STATE_CANCELLING": "cancelling", "JOB_STATE_SUCCEEDED": "completed",
            "JOB_STATE_PARTIALLY_SUCCEEDED": "completed", "JOB_STATE_FAILED": "failed",
            "JOB_STATE_CANCELLED": "cancelled", "JOB_STATE_EXPIRED": "expired"}
WINDOW_SECONDS = 48 * 3600  # Gemini expires a job that has not ended in 48 hours
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}  # else "content_filter"
GONE = {"CANCELLED": "batch_cancelled", "DEADLINE_EXCEEDED": "batch_expired"}  # collect's


def client(api_key: str, base_url: str | None) -> genai.Client:
    options = types.HttpOptions(
        base_url=base_url or DEFAULT_BASE_URL,
        retry_options=types.HttpRetryOptions(attempts=4, http_status_codes=[408, 429]))
    return genai.Client(api_key=api_key, http_options=options)


class GeminiBatches(BatchAPI):
    kind = "gemini"
    transient = TRANSIENT
    tags_batches = True
    state_names = {"validating": "pending (not started)", "in_progress": "running",
                   "completed": "succeeded"}

    def __init__(self, sdk: genai.Client, base_url: str | None):
        self.sdk = sdk
        self.base_url = base_url or DEFAULT_BASE_URL

    def check_model(self, model: str) -> None:
        try:
            self.sdk.models.get(model=model)
            return
        except errors.ClientError as exc:
            if exc.code != 404:
                raise
        names = [m.name.removeprefix("models/") for m in self.sdk.models.list()
                 if m.name]
        raise unknown_model(self.base_url, model, names)

    def upload(self, filename: str, payload: bytes, orphans_since: float | None = None
               ) -> str:
        if orphans_since is not None:  # an upload cut short by a kill, never journaled
            for old in self.sdk.files.list(config={"page_size": PAGE_SIZE}):
                if (old.display_name == filename and old.create_time
                        and old.create_time.timestamp() >= orphans_since - SLACK_SECONDS):
                    self.sdk.files.delete(name=old.name)
                    get_run_logger().info("deleted %s, an upload of %s that was never "
                                          "journaled", old.name, filename)
        model, lines = None, io.BytesIO()
        for line in payload.splitlines():
            if line.strip():
                request = json.loads(line)
                model = request["body"]["model"]
                lines.write(json.dumps({"key": request["custom_id"],
                                        "request": content_request(request["body"])}
                                       ).encode() + b"\n")
        lines.seek(0)
        uploaded = self.sdk.files.upload(file=lines, config={"display_name": filename,
                                                             "mime_type": "jsonl"})
        return f"{uploaded.name}@{model}"

    def create(self, upload_id: str, endpoint: str, metadata: dict[str, str]) -> Batch:
        file_name, _, model = upload_id.partition("@")
        return as_batch(self.sdk.batches.create(
            model=model, src=file_name,
            config={"display_name": NAME_PREFIX + urlencode(metadata)}))

    def find(self, intent: Intent) -> Batch | None:
        for job in self.sdk.batches.list(config={"page_size": PAGE_SIZE}):
            batch = as_batch(job)
            if batch.created_at < intent.since - SLACK_SECONDS:
                continue  # the order of the list is not promised: read it all
            if batch.metadata and all(batch.metadata.get(k) == v
                                      for k, v in intent.metadata.items()):
                return batch
        return None

    def look(self, batch_ids: list[str]) -> list[Batch]:
        """Those among the newest PAGE_SIZE jobs from one list call, any other by itself."""
        wanted = set(batch_ids)
        listed = {job.name: job for job in
                  self.sdk.batches.list(config={"page_size": PAGE_SIZE}).page
                  if job.name in wanted}
        return [as_batch(listed.get(batch_id) or self.sdk.batches.get(name=batch_id))
                for batch_id in batch_ids]

    def cancel(self, batch_id: str) -> bool:
        try:
            self.sdk.batches.cancel(name=batch_id)
            return True
        except errors.ClientError as exc:
            if exc.code == 400:  # it ended between the look and the cancel
                return False
            raise

    @contextmanager
    def result_files(self, batch: Batch, custom_ids: pa.Array) -> Iterator[list[str]]:
        """The result file (`output_file_id`, as `as_batch` reads it) streams to disk,
        then line by line into a file of OpenAI output and error lines: a large job's
        results are never whole in memory."""
        with _temp_file() as downloaded, _temp_file() as translated:
            if batch.output_file_id:
                self.sdk.files.download(file=batch.output_file_id, destination=downloaded)
            with open(downloaded, encoding="utf-8") as lines, open(translated, "w") as sink:
                for line in lines:
                    if line.strip():
                        sink.write(json.dumps(output_line(json.loads(line))) + "\n")
            yield [translated]

    def results_kept(self, batch: Batch) -> bool:
        try:
            if batch.output_file_id:
                self.sdk.files.get(name=batch.output_file_id)
        except errors.ClientError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def clean_up(self, batch: Batch) -> None:
        """The batch and its result file; the input file expires at Gemini by itself
        (a job does not name it back)."""
        try:
            if batch.output_file_id:
                self.sdk.files.delete(name=batch.output_file_id)
            self.sdk.batches.delete(name=batch.id)
        except errors.ClientError as exc:
            if exc.code != 404:
                raise

    def answer_now(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = content_request(body)
        config = {**request.get("generation_config", {}),
                  "system_instruction": request.get("system_instruction")}
        try:
            response = self.sdk.models.generate_content(
                model=body["model"], contents=_with_bytes(request["contents"]), config=config)
        except errors.APIError as exc:
            if exc.code in JOB_ERRORS:
                raise
            return exc.code or 500, {"error": {"message": f"{exc.status}: {exc.message}"}}
        return 200, chat_completion(response.model_dump(mode="json", by_alias=True,
                                                        exclude_none=True))


def content_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request (as the job renders it) as a Gemini GenerateContentRequest
    in REST JSON: system messages as the system instruction, images as inline data (or
    a URI part for an http URL), the answer's JSON schema as `response_json_schema`, the
    job's `extra` settings as generation settings as they are."""
    body = dict(body)
    body.pop("model")
    request: dict[str, Any] = {"contents": []}
    system = []
    for message in body.pop("messages"):
        content = message["content"]
        if message["role"] in ("system", "developer"):
            system.append(content if isinstance(content, str)
                          else "".join(p.get("text") or "" for p in content))
            continue
        parts = ([{"text": content}] if isinstance(content, str)
                 else [_part(p) for p in content])
        request["contents"].append({"role": "model" if message["role"] == "assistant"
                                    else "user", "parts": parts})
    if system:
        request["system_instruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config: dict[str, Any] = {}
    ceilings = body.pop("max_completion_tokens", None), body.pop("max_tokens", None)
    if any(ceilings):
        config["max_output_tokens"] = next(filter(None, ceilings))
    for name in ("temperature", "top_p", "seed"):
        if name in body:
            config[name] = body.pop(name)
    response_format = body.pop("response_format", None) or {}
    if response_format.get("type") in ("json_schema", "json_object"):
        config["response_mime_type"] = "application/json"
    if response_format.get("type") == "json_schema":
        config["response_json_schema"] = response_format["json_schema"]["schema"]
    config.update(body)
    if config:
        request["generation_config"] = config
    return request


def chat_completion(response: dict[str, Any]) -> dict[str, Any]:
    """A GenerateContentResponse (REST JSON) as the body of an OpenAI chat completion:
    its first candidate's text (thoughts left out), its finish reason, its usage, with
    thinking tokens counted as output, as they are billed."""
    candidates = response.get("candidates") or []
    candidate = candidates[0] if candidates else {}  # none: the prompt itself was blocked
    parts = (candidate.get("content") or {}).get("parts") or []
    texts = [p["text"] for p in parts if p.get("text") is not None and not p.get("thought")]
    reason = FINISH_REASONS.get(candidate.get("finishReason") or "STOP", "content_filter"
                                ) if candidates else "content_filter"
    usage = response.get("usageMetadata") or {}
    prompt = usage.get("promptTokenCount") or 0
    completion = (usage.get("candidatesTokenCount") or 0) + (usage.get("thoughtsTokenCount")
                                                             or 0)
    return {"id": response.get("responseId"), "object": "chat.completion",
            "model": response.get("modelVersion"),
            "choices": [{"index": 0, "finish_reason": reason, "message": {
                "role": "assistant", "content": "".join(texts) if texts else None,
                "refusal": "the model refused" if reason == "content_filter" else None}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def output_line(line: dict[str, Any]) -> dict[str, Any]:
    """A Gemini result line as an OpenAI batch output or error line."""
    custom_id = line.get("key")
    if line.get("response") is not None:
        return {"custom_id": custom_id, "response": {
            "status_code": 200, "body": chat_completion(line["response"])}}
    error = line.get("error") or {}
    if error.get("status") in GONE:
        return {"custom_id": custom_id, "response": None, "error": {
            "code": GONE[error["status"]], "message": error.get("message")}}
    return {"custom_id": custom_id, "response": {
        "status_code": error.get("code") or 500,
        "body": {"error": {"message": f"{error.get('status')}: {error.get('message')}"}}}}


def as_batch(job: types.BatchJob) -> Batch:
    """A Gemini batch job as the flow sees every batch: OpenAI's Batch model, its
    metadata read back from its display name."""
    created = int(job.create_time.timestamp()) if job.create_time else 0
    name = job.display_name or ""
    metadata = dict(parse_qsl(name.removeprefix(NAME_PREFIX))) if name.startswith(
        NAME_PREFIX) else None
    return Batch(id=job.name, object="batch", endpoint="/v1/chat/completions",
                 status=STATUSES.get(job.state.value if job.state else "", "in_progress"),
                 input_file_id="", completion_window="24h", created_at=created,
                 expires_at=created + WINDOW_SECONDS, metadata=metadata,
                 output_file_id=job.dest.file_name if job.dest else None)


def _part(part: dict[str, Any]) -> dict[str, Any]:
    """A chat content part as a Gemini part."""
    if part.get("type") != "image_url":
        return {"text": part.get("text") or ""}
    url = part["image_url"]["url"]
    if url.startswith("data:"):
        mime_type, _, data = url.removeprefix("data:").partition(";base64,")
        return {"inline_data": {"mime_type": mime_type, "data": data}}
    return {"file_data": {"file_uri": url,
                          "mime_type": mimetypes.guess_type(url)[0] or "image/jpeg"}}


def _with_bytes(contents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contents as the SDK takes them: inline data as bytes, not base64."""
    return [{**content, "parts": [
        {"inline_data": {**part["inline_data"],
                         "data": base64.b64decode(part["inline_data"]["data"])}}
        if "inline_data" in part else part for part in content["parts"]]}
        for content in contents]


@contextmanager
def _temp_file() -> Iterator[str]:
    handle, path = tempfile.mkstemp(suffix=".jsonl")
    os.close(handle)
    try:
        yield path
    finally:
        os.remove(path)
