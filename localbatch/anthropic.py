"""Anthropic's face: Message Batches (`/v1/messages/batches`) and Messages (`/v1/messages`).

One store, one lifecycle, one engine for every face: a Message Batch is kept as a batch of
chat requests, each Anthropic request translated (`chat_body`), and is shown back in
Anthropic's shapes (`message_batch`, `result_line`). As Anthropic does, a batch counts
every request as `processing` until the whole batch ends, then tallies them as
succeeded, errored, canceled or expired; its results stream from its `results_url`.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from localbatch.engines import CHAT_URL
from localbatch.errors import APIError, json_body, not_found
from localbatch.lifecycle import ANTHROPIC_MAX_REQUESTS, ID_PREFIXES, Lifecycle
from localbatch.store import Store, new_id, rfc3339

MESSAGES_PATH = "/v1/messages"
MAX_BATCH_BYTES = 256 * 1024 * 1024
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ENDED = {"completed", "failed", "expired", "cancelled"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}
FAILURES = {"batch_cancelled": "canceled", "batch_expired": "expired"}  # by error code
TOOL_SCHEMA = "tool_use__"  # a response_format named so answers as that tool's tool_use


def add_routes(app: FastAPI, lifecycle: Lifecycle) -> None:
    store, engine = lifecycle.store, lifecycle.engine

    @app.post(MESSAGES_PATH)
    async def create_message(request: Request):
        body = chat_body(await json_body(request))
        status, answer = engine.answer(CHAT_URL, body)
        if status != 200:
            raise APIError(status, answer["error"]["message"],
                           type_=ERROR_TYPES.get(status, "api_error"))
        return message(answer, body)

    @app.post(f"{MESSAGES_PATH}/batches")
    async def create_batch(request: Request):
        body = await json_body(request)
        requests = body.get("requests") if isinstance(body, dict) else None
        _check_requests(requests, len(await request.body()))
        lines = [{"custom_id": r["custom_id"], "method": "POST", "url": CHAT_URL,
                  "body": chat_body(r.get("params"))} for r in requests]
        with tempfile.NamedTemporaryFile("w", dir=store.work_dir, suffix=".jsonl") as temp:
            temp.writelines(json.dumps(line) + "\n" for line in lines)
            temp.flush()
            upload = store.add_file(temp.name, "message_batch.jsonl", "batch")
        batch = lifecycle.create(upload["id"], CHAT_URL, "24h", None, None, "anthropic")
        return message_batch(store, batch, str(request.base_url))

    @app.get(f"{MESSAGES_PATH}/batches")
    def list_batches(request: Request, after_id: str | None = None,
                     before_id: str | None = None,
                     limit: int = Query(20, ge=1, le=1000)):
        if before_id:  # newest first: the page before a batch is the newer ones
            newer, _ = store.list_batches(None, 100_000, ID_PREFIXES["anthropic"])
            ids = [b["id"] for b in newer]
            end = ids.index(before_id) if before_id in ids else 0
            items, has_more = newer[max(0, end - limit):end], end > limit
        else:
            items, has_more = store.list_batches(after_id, limit, ID_PREFIXES["anthropic"])
        data = [message_batch(store, b, str(request.base_url)) for b in items]
        return {"data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @app.get(f"{MESSAGES_PATH}/batches/{{batch_id}}")
    def get_batch(batch_id: str, request: Request):
        return message_batch(store, _batch(batch_id), str(request.base_url))

    @app.post(f"{MESSAGES_PATH}/batches/{{batch_id}}/cancel")
    def cancel_batch(batch_id: str, request: Request):
        batch = _batch(batch_id)
        if batch["status"] not in ENDED:
            batch = lifecycle.cancel(batch_id)
        return message_batch(store, batch, str(request.base_url))

    @app.get(f"{MESSAGES_PATH}/batches/{{batch_id}}/results")
    def batch_results(batch_id: str):
        batch = _ended_batch(batch_id, "has not yet ended; its results are not available")
        return StreamingResponse(
            (json.dumps(line) + "\n" for line in results(store, batch)),
            media_type="application/binary")

    @app.delete(f"{MESSAGES_PATH}/batches/{{batch_id}}")
    def delete_batch(batch_id: str):
        batch = _ended_batch(batch_id, "cannot be deleted while it is processing; cancel "
                                       "it first")
        for field in ("input_file_id", "output_file_id", "error_file_id"):
            if batch[field]:
                store.delete_file(batch[field])
        store.delete_batch(batch_id)
        return {"id": batch_id, "type": "message_batch_deleted"}

    def _batch(batch_id: str) -> dict:
        batch = store.get_batch(batch_id)
        if batch is None or not batch_id.startswith(ID_PREFIXES["anthropic"]):
            raise not_found("message batch", batch_id)
        return batch

    def _ended_batch(batch_id: str, otherwise: str) -> dict:
        batch = _batch(batch_id)
        if batch["status"] not in ENDED:
            raise APIError(400, f"Message Batch {batch_id} {otherwise}.",
                           type_="invalid_request_error")
        return batch


def chat_body(params: Any) -> dict[str, Any]:
    """An Anthropic Messages request as the engine's chat request. Structured output
    (`output_config.format`) and a forced tool (`tool_choice` of type `tool`) are its
    `response_format`; what cannot be translated stays wrong, for the engine to refuse."""
    if not isinstance(params, dict):
        return {"model": None}
    messages = []
    system = params.get("system")
    if isinstance(system, list):
        system = " ".join(b.get("text", "") for b in system if isinstance(b, dict))
    if system:
        messages.append({"role": "system", "content": system})
    for item in params.get("messages") or []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):
            content = [_chat_part(block) for block in content]
        messages.append({"role": item.get("role") if isinstance(item, dict) else None,
                         "content": content})
    body: dict[str, Any] = {"model": params.get("model"), "messages": messages,
                            "max_tokens": params.get("max_tokens")}
    for name in ("temperature", "top_p"):
        if name in params:
            body[name] = params[name]
    schema = _answer_schema(params)
    if schema is not None:
        tool = _forced_tool(params)
        name = f"{TOOL_SCHEMA}{tool['name']}" if tool else "answer"
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": name, "schema": schema}}
    return body


def message(answer: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The engine's chat answer to `body` (`chat_body`'s) as an Anthropic Message: a
    forced tool's as its tool_use block."""
    choice = answer["choices"][0]
    text = choice["message"]["content"] or ""
    tool = _forced_tool_name(body)
    if tool is not None:
        content = [{"type": "tool_use", "id": new_id("toolu_", 12), "name": tool,
                    "input": json.loads(text)}]
        stop_reason = "tool_use"
    else:
        content = [{"type": "text", "text": text}]
        stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")
    usage = answer["usage"]
    return {"id": new_id("msg_", 12), "type": "message", "role": "assistant",
            "model": body["model"], "content": content, "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": usage["prompt_tokens"],
                      "output_tokens": usage["completion_tokens"],
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def message_batch(store: Store, batch: dict[str, Any], base_url: str) -> dict[str, Any]:
    """A stored batch as Anthropic shows a Message Batch."""
    ended = batch["status"] in ENDED
    counts = batch["request_counts"]
    tally = {"processing": 0 if ended else counts["total"], "succeeded": 0, "errored": 0,
             "canceled": 0, "expired": 0}
    if ended:
        tally["succeeded"] = counts["completed"]
        tally.update(_failures(store, batch))
    ended_at = next((batch[f"{s}_at"] for s in ENDED if batch.get(f"{s}_at")), None)
    return {
        "id": batch["id"], "type": "message_batch",
        "processing_status": "ended" if ended else
        "canceling" if batch["status"] == "cancelling" else "in_progress",
        "request_counts": tally, "created_at": rfc3339(batch["created_at"]),
        "expires_at": rfc3339(batch["expires_at"]), "ended_at": rfc3339(ended_at),
        "cancel_initiated_at": rfc3339(batch.get("cancelling_at")), "archived_at": None,
        "results_url": f"{base_url.rstrip('/')}{MESSAGES_PATH}/batches/{batch['id']}/results"
        if ended else None,
    }


def results(store: Store, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Anthropic's result lines of an ended batch: those that succeeded from its output
    file, the others from its error file."""
    bodies = {line["custom_id"]: line["body"]
              for line in store.json_lines(batch["input_file_id"])}
    for field in ("output_file_id", "error_file_id"):
        for line in store.json_lines(batch[field]):
            yield result_line(line, bodies[line["custom_id"]])


def result_line(line: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """One line of an OpenAI-shaped output or error file, as Anthropic's result."""
    response, error = line.get("response"), line.get("error")
    if response and response["status_code"] == 200:
        result = {"type": "succeeded", "message": message(response["body"], body)}
    elif error and error.get("code") in FAILURES:
        result = {"type": FAILURES[error["code"]]}
    else:
        status = response["status_code"] if response else 500
        text = (response["body"]["error"]["message"] if response else
                (error or {}).get("message", "error"))
        result = {"type": "errored", "error": {"type": "error", "error": {
            "type": ERROR_TYPES.get(status, "api_error"), "message": text}}}
    return {"custom_id": line["custom_id"], "result": result}


def _failures(store: Store, batch: dict[str, Any]) -> dict[str, int]:
    """The ended batch's requests that did not succeed, told apart by their error."""
    tally = {"errored": 0, "canceled": 0, "expired": 0}
    for line in store.json_lines(batch["error_file_id"]):
        tally[FAILURES.get((line.get("error") or {}).get("code"), "errored")] += 1
    return tally


def _chat_part(block: Any) -> Any:
    """A content block as a chat part: text as it is, an image as an image URL."""
    if not isinstance(block, dict) or block.get("type") != "image":
        return block
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    else:
        url = source.get("url")
    return {"type": "image_url", "image_url": {"url": url}}


def _answer_schema(params: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema the answer must fit: structured output's, or the forced tool's."""
    output_format = (params.get("output_config") or {}).get("format") or {}
    if output_format.get("type") == "json_schema":
        return output_format.get("schema")
    tool = _forced_tool(params)
    return tool.get("input_schema") if tool else None


def _forced_tool(params: dict[str, Any]) -> dict[str, Any] | None:
    choice = params.get("tool_choice") or {}
    if choice.get("type") != "tool":
        return None
    return next((t for t in params.get("tools") or [] if t.get("name") == choice.get("name")),
                None)


def _forced_tool_name(body: dict[str, Any]) -> str | None:
    name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
    return name.removeprefix(TOOL_SCHEMA) if name.startswith(TOOL_SCHEMA) else None


def _check_requests(requests: Any, size: int) -> None:
    """The envelope Anthropic checks at create (a request's params are checked as it is
    processed, its error in its result)."""
    if not isinstance(requests, list) or not requests:
        raise APIError(400, "requests: a non-empty list of {custom_id, params} is required",
                       type_="invalid_request_error")
    if len(requests) > ANTHROPIC_MAX_REQUESTS or size > MAX_BATCH_BYTES:
        raise APIError(413, f"A Message Batch may hold at most {ANTHROPIC_MAX_REQUESTS:,} "
                       "requests and 256 MB.", type_="request_too_large")
    seen = set()
    for i, request in enumerate(requests):
        custom_id = request.get("custom_id") if isinstance(request, dict) else None
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise APIError(400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$",
                           type_="invalid_request_error")
        if custom_id in seen:
            raise APIError(400, f"requests.{i}.custom_id: {custom_id!r} is used twice; "
                           "custom_id must be unique within a batch",
                           type_="invalid_request_error")
        seen.add(custom_id)
