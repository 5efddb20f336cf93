"""Gemini's face: Batch Mode and the Files API of the Gemini Developer API, under
`/gemini/` (its `v1` and `v1beta` alike: the SDK's default `v1` would meet OpenAI's routes).

As on the other faces, a Gemini batch is kept as a batch of chat requests over the one
store, lifecycle and engine: its input file of `{key, request}` lines is translated at
create (`chat_body`) and its answers shown back as `GenerateContentResponse`s
(`generate_content_response`). A batch is a long-running operation named
`batches/ID` whose state goes PENDING (our `validating`), RUNNING, then SUCCEEDED,
FAILED, CANCELLED or EXPIRED, with no per-request progress; once it has ended its
results are a file, `files/results-ID`, streamed line by line from the batch's output
and error files when downloaded. Uploads follow the resumable protocol the
`google-genai` SDK speaks: a start call that answers with an upload URL, then chunks.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from localbatch.engines import CHAT_URL
from localbatch.errors import GOOGLE_STATUSES, APIError, json_body
from localbatch.lifecycle import ID_PREFIXES, Lifecycle
from localbatch.store import BATCH_FILE_TTL, Store, new_id, rfc3339

GEMINI_PATH = "/gemini"  # a google-genai client's base URL ends with it
API = GEMINI_PATH + "/{version}"
UPLOAD_PATH = GEMINI_PATH + "/upload/{version}/files"
RESULTS_PREFIX = "results-"  # a batch's result file is `files/results-<batch id>`
STATES = {"validating": "PENDING", "in_progress": "RUNNING", "finalizing": "RUNNING",
          "cancelling": "RUNNING", "completed": "SUCCEEDED", "failed": "FAILED",
          "cancelled": "CANCELLED", "expired": "EXPIRED"}
ENDED = {"completed", "failed", "expired", "cancelled"}
FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
# a request's error code in our error files, as Gemini's status of that request
FAILURES = {"batch_cancelled": (499, "CANCELLED"), "batch_expired": (504, "DEADLINE_EXCEEDED")}
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"


def add_routes(app: FastAPI, lifecycle: Lifecycle) -> None:
    store, engine = lifecycle.store, lifecycle.engine
    uploads: dict[str, dict[str, Any]] = {}  # resumable uploads begun, by upload id

    # files ----------------------------------------------------------------------------

    @app.post(UPLOAD_PATH)
    async def upload(request: Request, upload_id: str | None = None):
        command = request.headers.get("x-goog-upload-command", "")
        if upload_id is None:  # the start of a resumable upload: where to send the bytes
            if "start" not in command:
                raise APIError(400, "Only resumable uploads are taken: start with "
                               "X-Goog-Upload-Command: start.")
            described = ((await json_body(request)) or {}).get("file") or {}
            upload_id = secrets.token_hex(16)
            temp = tempfile.NamedTemporaryFile(dir=store.work_dir, delete=False)
            temp.close()
            uploads[upload_id] = {"path": Path(temp.name), "display_name":
                                  described.get("displayName") or described.get("display_name")}
            url = f"{str(request.base_url).rstrip('/')}{request.url.path}?upload_id={upload_id}"
            return JSONResponse({}, headers={"x-goog-upload-url": url,
                                             "x-goog-upload-status": "active"})
        session = uploads.get(upload_id)
        if session is None:
            raise APIError(404, f"No upload in progress with id '{upload_id}'.")
        with session["path"].open("ab") as out:
            async for chunk in request.stream():
                out.write(chunk)
        if "finalize" not in command:
            return JSONResponse({}, headers={"x-goog-upload-status": "active"})
        del uploads[upload_id]
        saved = await run_in_threadpool(store.add_file, session["path"],
                                        session["display_name"] or "upload.jsonl", "batch",
                                        BATCH_FILE_TTL)
        session["path"].unlink()
        return JSONResponse({"file": file_resource(saved)},
                            headers={"x-goog-upload-status": "final"})

    @app.get(f"{API}/files")
    def list_files(pageSize: int = Query(10, ge=1, le=100),  # noqa: N803 (Gemini's names)
                   pageToken: str | None = None):  # noqa: N803
        items, has_more = store.list_files("batch", pageToken, pageSize, "desc")
        return {"files": [file_resource(f) for f in items],
                **({"nextPageToken": items[-1]["id"]} if has_more else {})}

    @app.get(f"{API}/files/{{name}}")
    def get_file(name: str):
        file_id, _, verb = name.partition(":")
        if file_id.startswith(RESULTS_PREFIX):
            batch = _ended_batch(file_id.removeprefix(RESULTS_PREFIX))
            if verb == "download":
                return StreamingResponse(
                    (json.dumps(line) + "\n" for line in results(store, batch)),
                    media_type="application/jsonl")
            return results_file_resource(batch)
        found = store.get_file(file_id)
        if found is None:
            raise APIError(404, f"File files/{file_id} does not exist.")
        if verb == "download":
            return FileResponse(store.file_path(file_id), media_type="application/jsonl")
        return file_resource(found)

    @app.delete(f"{API}/files/{{name}}")
    def delete_file(name: str):
        if name.startswith(RESULTS_PREFIX):  # its batch holds it: gone with the batch
            _ended_batch(name.removeprefix(RESULTS_PREFIX))
        elif not store.delete_file(name):
            raise APIError(404, f"File files/{name} does not exist.")
        return {}

    # models: generate content, now or as a batch -------------------------------------

    @app.post(f"{API}/models/{{target}}")
    async def model_method(target: str, request: Request):
        model, _, method = target.partition(":")
        body = await json_body(request)
        if not engine.knows(model):
            raise APIError(404, f"models/{model} is not found, or is not supported for "
                           f"{method}.")
        if method == "generateContent":
            status, answer = await run_in_threadpool(
                engine.answer, CHAT_URL, chat_body(body, model))
            if status != 200:
                raise APIError(status, answer["error"]["message"])
            return generate_content_response(answer, model)
        if method == "batchGenerateContent":
            return await run_in_threadpool(_create_batch, model, (body or {}).get("batch"),
                                           str(request.base_url))
        raise APIError(404, f"No method {method!r} on models.")

    def _create_batch(model: str, spec: Any, base_url: str) -> dict[str, Any]:
        spec = spec if isinstance(spec, dict) else {}
        source = spec.get("inputConfig") or spec.get("input_config") or {}
        file_name = source.get("fileName") or source.get("file_name")
        if file_name:
            file_id = file_name.removeprefix("files/")
            if store.get_file(file_id) is None:
                raise APIError(400, f"inputConfig.fileName: file {file_name} does not exist.")
            lines = store.json_lines(file_id)
        elif (source.get("requests") or {}).get("requests"):
            lines = ({"key": (r.get("metadata") or {}).get("key", str(i)),
                      "request": r.get("request")}
                     for i, r in enumerate(source["requests"]["requests"]))
        else:
            raise APIError(400, "batch.inputConfig: give a fileName or inline requests.")
        with tempfile.NamedTemporaryFile("w", dir=store.work_dir, suffix=".jsonl") as temp:
            for line in lines:
                temp.write(json.dumps({"custom_id": str(line.get("key")), "method": "POST",
                                       "url": CHAT_URL,
                                       "body": chat_body(line.get("request"), model)}) + "\n")
            temp.flush()
            translated = store.add_file(temp.name, "gemini_batch.jsonl", "batch")
        display_name = str(spec.get("displayName") or spec.get("display_name") or "")
        batch = lifecycle.create(translated["id"], CHAT_URL, "24h",
                                 {"display_name": display_name[:512],
                                  "gemini_input": file_name or ""}, None, "gemini")
        return operation(batch, model)

    @app.get(f"{API}/models")
    def list_models():
        return {"models": [model_resource(m) for m in engine.models()]}

    @app.get(f"{API}/models/{{model}}")
    def get_model(model: str):
        if not engine.knows(model):
            raise APIError(404, f"models/{model} is not found.")
        return model_resource(model)

    # batches --------------------------------------------------------------------------

    @app.get(f"{API}/batches")
    def list_batches(pageSize: int = Query(50, ge=1, le=1000),  # noqa: N803
                     pageToken: str | None = None):  # noqa: N803
        items, has_more = store.list_batches(pageToken, pageSize, ID_PREFIXES["gemini"])
        return {"operations": [operation(b) for b in items],
                **({"nextPageToken": items[-1]["id"]} if has_more else {})}

    @app.get(f"{API}/batches/{{batch_id}}")
    def get_batch(batch_id: str):
        return operation(_batch(batch_id))

    @app.post(f"{API}/batches/{{target}}")
    def batch_method(target: str):
        batch_id, _, method = target.partition(":")
        if method != "cancel":
            raise APIError(404, f"No method {method!r} on batches.")
        batch = _batch(batch_id)
        if batch["status"] in ENDED:
            raise APIError(400, f"Batch batches/{batch_id} has already ended "
                           f"({STATES[batch['status']]}); it cannot be cancelled.")
        lifecycle.cancel(batch_id)
        return {}

    @app.delete(f"{API}/batches/{{batch_id}}")
    def delete_batch(batch_id: str):
        batch = _ended_batch(batch_id)
        for file_id in (batch["input_file_id"], batch["output_file_id"],
                        batch["error_file_id"],
                        (batch["metadata"] or {}).get("gemini_input", "").removeprefix("files/")):
            if file_id:
                store.delete_file(file_id)
        store.delete_batch(batch_id)
        return {}

    def _batch(batch_id: str) -> dict[str, Any]:
        batch = store.get_batch(batch_id)
        if batch is None or not batch_id.startswith(ID_PREFIXES["gemini"]):
            raise APIError(404, f"Batch batches/{batch_id} does not exist.")
        return batch

    def _ended_batch(batch_id: str) -> dict[str, Any]:
        batch = _batch(batch_id)
        if batch["status"] not in ENDED:
            raise APIError(400, f"Batch batches/{batch_id} has not ended "
                           f"({STATES[batch['status']]}).")
        return batch


def chat_body(request: Any, model: str) -> dict[str, Any]:
    """A Gemini `GenerateContentRequest` (camelCase or snake_case, as the REST API takes
    both) as the engine's chat request: system instruction, contents with inline or URI
    images, generation config with its JSON schema as `response_format`."""
    request = request if isinstance(request, dict) else {}
    messages = []
    system = _field(request, "system_instruction")
    if isinstance(system, dict):
        messages.append({"role": "system", "content": "".join(
            p.get("text") or "" for p in system.get("parts") or [])})
    for content in request.get("contents") or []:
        content = content if isinstance(content, dict) else {}
        messages.append({"role": "assistant" if content.get("role") == "model" else "user",
                         "content": [_chat_part(p) for p in content.get("parts") or []]})
    body: dict[str, Any] = {"model": model, "messages": messages}
    config = _field(request, "generation_config") or {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                         ("max_tokens", "max_output_tokens"), ("seed", "seed")):
        if _field(config, theirs) is not None:
            body[ours] = _field(config, theirs)
    schema = _field(config, "response_json_schema") or _field(config, "response_schema")
    if schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "answer", "schema": schema}}
    return body


def generate_content_response(answer: dict[str, Any], model: str) -> dict[str, Any]:
    """The engine's chat answer as a `GenerateContentResponse`."""
    choice, usage = answer["choices"][0], answer["usage"]
    return {"candidates": [{"content": {"role": "model",
                                        "parts": [{"text": choice["message"]["content"] or ""}]},
                            "finishReason": FINISH_REASONS.get(choice["finish_reason"], "STOP"),
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": usage["prompt_tokens"],
                              "candidatesTokenCount": usage["completion_tokens"],
                              "totalTokenCount": usage["total_tokens"]},
            "modelVersion": model, "responseId": new_id("", 8)}


def operation(batch: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """A stored batch as Gemini shows a batch: a long-running operation."""
    name = f"batches/{batch['id']}"
    ended = batch["status"] in ENDED
    counts = batch["request_counts"]
    metadata = {
        "@type": BATCH_TYPE, "name": name,
        "displayName": (batch["metadata"] or {}).get("display_name", ""),
        "model": f"models/{model or batch.get('model') or ''}",
        "state": f"BATCH_STATE_{STATES[batch['status']]}",
        "createTime": rfc3339(batch["created_at"]),
        "updateTime": rfc3339(max(v for k, v in batch.items()
                                   if k.endswith("_at") and isinstance(v, int)
                                   and k != "expires_at")),
        "batchStats": {"requestCount": str(counts["total"]),
                       "successfulRequestCount": str(counts["completed"]),
                       "failedRequestCount": str(counts["failed"]),
                       "pendingRequestCount": str(counts["total"] - counts["completed"]
                                                  - counts["failed"])},
    }
    if ended:
        ended_at = next(batch[f"{s}_at"] for s in ENDED if batch.get(f"{s}_at"))
        metadata["endTime"] = rfc3339(ended_at)
        if batch["output_file_id"] or batch["error_file_id"]:
            metadata["output"] = {"responsesFile": f"files/{RESULTS_PREFIX}{batch['id']}"}
    return {"name": name, "metadata": metadata, "done": ended}


def results(store: Store, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The result lines of an ended batch: each request's key with its response, or
    with its error."""
    for field in ("output_file_id", "error_file_id"):
        for line in store.json_lines(batch[field]):
            yield result_line(line, batch.get("model") or "")


def result_line(line: dict[str, Any], model: str) -> dict[str, Any]:
    """One line of an OpenAI-shaped output or error file, as Gemini's result line."""
    response, error = line.get("response"), line.get("error")
    if response and response["status_code"] == 200:
        return {"key": line["custom_id"],
                "response": generate_content_response(response["body"], model)}
    if error and error.get("code") in FAILURES:
        code, status = FAILURES[error["code"]]
        message = error.get("message", "")
    else:
        code = response["status_code"] if response else 500
        status = GOOGLE_STATUSES.get(code, "INTERNAL")
        message = (response["body"]["error"]["message"] if response else
                   (error or {}).get("message", "error"))
    return {"key": line["custom_id"], "error": {"code": code, "message": message,
                                                "status": status}}


def file_resource(stored: dict[str, Any]) -> dict[str, Any]:
    created = rfc3339(stored["created_at"])
    return {"name": f"files/{stored['id']}", "displayName": stored["filename"],
            "mimeType": "application/jsonl", "sizeBytes": str(stored["bytes"]),
            "createTime": created, "updateTime": created,
            "expirationTime": rfc3339(stored["expires_at"]), "state": "ACTIVE",
            "source": "UPLOADED"}


def results_file_resource(batch: dict[str, Any]) -> dict[str, Any]:
    name = f"files/{RESULTS_PREFIX}{batch['id']}"
    return {"name": name, "displayName": name, "mimeType": "application/jsonl",
            "createTime": rfc3339(batch["created_at"]), "state": "ACTIVE",
            "source": "GENERATED", "downloadUri": f"{name}:download?alt=media"}


def model_resource(model: str) -> dict[str, Any]:
    return {"name": f"models/{model}", "baseModelId": model, "displayName": model,
            "supportedGenerationMethods": ["generateContent", "batchGenerateContent"]}


def _field(node: dict[str, Any], snake: str) -> Any:
    """A field by its snake_case name or its camelCase one."""
    if snake in node:
        return node[snake]
    head, *rest = snake.split("_")
    return node.get(head + "".join(word.title() for word in rest))


def _chat_part(part: Any) -> dict[str, Any]:
    """A Gemini part as a chat content part: text, or an image as an image URL."""
    part = part if isinstance(part, dict) else {}
    inline, uri = _field(part, "inline_data"), _field(part, "file_data")
    if isinstance(inline, dict):  # bytes in JSON: base64, standard or URL-safe
        data = str(inline.get("data")).replace("-", "+").replace("_", "/")
        return {"type": "image_url", "image_url": {
            "url": f"data:{_field(inline, 'mime_type')};base64,{data}"}}
    if isinstance(uri, dict):
        return {"type": "image_url", "image_url": {"url": _field(uri, "file_uri")}}
    return {"type": "text", "text": part.get("text")}
