"""HTTP routes of the local server: parse OpenAI-shaped requests, render OpenAI-shaped answers.

Azure OpenAI's v1 API is the same routes under `/openai/v1/`, with its `api-key` header;
a batch created there keeps Azure's rules (`Lifecycle.create`). Anthropic's and Gemini's
faces have routes of their own (`localbatch.anthropic`, `localbatch.gemini`).

The state lives in `Store` and moves in `Lifecycle`; this module only translates, checks
the bearer token, stamps `x-request-id` and injects the configured HTTP faults.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from pathlib import PurePath
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from localbatch.anthropic import MESSAGES_PATH
from localbatch.anthropic import add_routes as add_anthropic_routes
from localbatch.engines import BATCH_ENDPOINTS
from localbatch.errors import APIError, not_found
from localbatch.gemini import GEMINI_PATH
from localbatch.gemini import add_routes as add_gemini_routes
from localbatch.lifecycle import ID_PREFIXES, Lifecycle
from localbatch.simulation import AZURE_V1_PATH, Dice, HttpFault
from localbatch.store import BATCH_FILE_TTL, new_id

DIALECT = "localbatch.dialect"  # in a request's scope: the face it came in by
# each face's own key header, besides a bearer token
KEY_HEADERS = {"azure": "api-key", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}
UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data"})
MAX_FILE_BYTES = 512 * 1024 * 1024  # OpenAI's limit for a file of any purpose
FORM_SLACK = 1024 * 1024  # what the multipart form adds around the file
PEEK_BYTES = 64 * 1024  # how far into a large upload its purpose is looked for


class ExpiresAfter(BaseModel):
    """When the batch's output and error files expire, as OpenAI takes it."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: StrictInt = Field(ge=3600, le=2_592_000)


class CreateBatch(BaseModel):
    """The body of `POST /v1/batches`; anything else in it is refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, StrictStr] | None = None
    output_expires_after: ExpiresAfter | None = None


def create_app(lifecycle: Lifecycle, api_key: str | None = None) -> FastAPI:
    store, sim = lifecycle.store, lifecycle.sim
    fault_dice = Dice(None if sim.seed is None else sim.seed + 1)
    fault_counts = [0] * len(sim.http_faults)
    app = FastAPI(title="localbatch", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def envelope(request: Request, call_next):
        request_id = new_id("req_", 16)
        if request.url.path.startswith(AZURE_V1_PATH):  # Azure's face: the same routes
            request.scope["path"] = "/v1/" + request.url.path.removeprefix(AZURE_V1_PATH)
            request.scope[DIALECT] = "azure"
        elif request.url.path.startswith(MESSAGES_PATH):
            request.scope[DIALECT] = "anthropic"
        elif request.url.path.startswith(GEMINI_PATH):
            request.scope[DIALECT] = "gemini"
        response = _auth_failure(request, api_key)
        fault = None if response else _injected_fault(request)
        if fault is not None and not fault.lost_response:
            response = await _fault_answer(fault, request)
        if response is None:
            response = await call_next(request)
            if fault is not None:  # done, and its answer lost on the way
                response = await _fault_answer(fault, request)
        response.headers["x-request-id"] = request_id
        return response

    def _injected_fault(request: Request) -> HttpFault | None:
        for i, fault in enumerate(sim.http_faults):
            if not fault.matches(request.method, request.url.path):
                continue
            if fault.times is not None and fault_counts[i] >= fault.times:
                continue
            if fault_dice.roll(fault.rate):
                fault_counts[i] += 1
                return fault
        return None

    async def _fault_answer(fault: HttpFault, request: Request) -> JSONResponse:
        await asyncio.sleep(fault.delay_seconds)
        dialect = request.scope.get(DIALECT, "openai")
        error = APIError(fault.status, f"Injected fault: HTTP {fault.status}.",
                         type_="rate_limit_error" if fault.status == 429 else
                         "api_error" if dialect == "anthropic" else "server_error")
        headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
        return JSONResponse(error.body(dialect), status_code=fault.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(request.scope.get(DIALECT, "openai")),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        error = APIError(400, f"Invalid request: {first.get('msg', 'bad input')}"
                         f"{f' ({param})' if param else ''}.", param=param)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code)

    # files ----------------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload_file(request: Request):
        # sizes are refused before the body is read, not after it was spooled to disk
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else 0
        if size > MAX_FILE_BYTES + FORM_SLACK:
            raise APIError(413, f"The request is {size:,} bytes; a file may be at most "
                           f"{MAX_FILE_BYTES:,} bytes.", param="file")
        if size > sim.max_file_bytes + FORM_SLACK:
            request, purpose = await _peek_purpose(request)
            if purpose == "batch":
                raise APIError(413, f"The request is {size:,} bytes; a batch input may be at "
                               f"most {sim.max_file_bytes:,} bytes.", param="file")
        form = await request.form(max_files=1)
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "Missing required parameter: 'file'.", param="file")
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(400, f"Invalid purpose '{purpose}'. Allowed: "
                           f"{', '.join(sorted(UPLOAD_PURPOSES))}.", param="purpose")
        filename = upload.filename or "upload"
        # OpenAI takes a nameless upload (the SDK names raw bytes `upload`) and any case
        # of .jsonl; it refuses another extension
        if purpose == "batch" and PurePath(filename).suffix.lower() not in ("", ".jsonl"):
            raise APIError(400, f"Invalid file format for Batch API: '{filename}'. The file "
                           "must be a .jsonl file.", param="file")
        ttl = _expires_after(form.get("expires_after[anchor]"),
                             form.get("expires_after[seconds]"))
        if ttl is None and purpose == "batch":
            ttl = BATCH_FILE_TTL
        size = upload.size if upload.size is not None else 0
        if purpose == "batch" and size > sim.max_file_bytes:
            raise APIError(413, f"File is {size:,} bytes; a batch input may be at most "
                           f"{sim.max_file_bytes:,} bytes.", param="file")
        if size > MAX_FILE_BYTES:
            raise APIError(413, f"File is {size:,} bytes; a file may be at most "
                           f"{MAX_FILE_BYTES:,} bytes.", param="file")
        return await run_in_threadpool(_save_upload, upload.file, filename, purpose, ttl)

    def _save_upload(source, filename: str, purpose: str, ttl: int | None) -> dict:
        with tempfile.NamedTemporaryFile(dir=store.work_dir, delete=True) as temp:
            source.seek(0)
            shutil.copyfileobj(source, temp)
            temp.flush()
            return store.add_file(temp.name, filename, purpose, ttl)

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, after: str | None = None,
                   limit: int = Query(10_000, ge=1, le=10_000),
                   order: str = Query("desc", pattern="^(asc|desc)$")):
        if after and store.get_file(after) is None:  # never restart at the first page
            raise not_found("file", after)
        items, has_more = store.list_files(purpose, after, limit, order)
        return _page(items, has_more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str):
        return store.get_file(file_id) or _raise(not_found("file", file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        if store.get_file(file_id) is None:
            raise not_found("file", file_id)
        return FileResponse(store.file_path(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        if not store.delete_file(file_id):
            raise not_found("file", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # batches --------------------------------------------------------------------------

    @app.post("/v1/batches")
    def create_batch(params: CreateBatch, request: Request):
        expires = params.output_expires_after
        return lifecycle.create(params.input_file_id, params.endpoint, params.completion_window,
                                params.metadata, expires.seconds if expires else None,
                                request.scope.get(DIALECT, "openai"))

    @app.get("/v1/batches")
    def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        if after and store.get_batch(after) is None:  # never restart at the first page
            raise not_found("batch", after)
        items, has_more = store.list_batches(after, limit, ID_PREFIXES["openai"])
        return _page(items, has_more)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str):
        return store.get_batch(batch_id) or _raise(not_found("batch", batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str):
        return lifecycle.cancel(batch_id)

    add_anthropic_routes(app, lifecycle)
    add_gemini_routes(app, lifecycle)

    # models ---------------------------------------------------------------------------

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [_model(name) for name in lifecycle.engine.models()]}

    @app.get("/v1/models/{model}")
    def get_model(model: str):
        if not lifecycle.engine.knows(model):
            raise APIError(404, f"The model '{model}' does not exist.", code="model_not_found",
                           param="model")
        return _model(model)

    # synchronous requests, answered by the same engine --------------------------------

    def _answering(url: str):
        async def answer(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError as exc:
                raise APIError(400, "The body is not valid JSON.") from exc
            if isinstance(body, dict) and body.get("stream"):
                raise APIError(400, "localbatch does not stream; send stream=false.",
                               param="stream")
            status, result = (await run_in_threadpool(lifecycle.engine.run, [(url, body)]))[0]
            return JSONResponse(result, status_code=status)
        return answer

    for url in sorted(BATCH_ENDPOINTS):
        app.add_api_route(url, _answering(url), methods=["POST"])

    return app


async def _peek_purpose(request: Request) -> tuple[Request, str | None]:
    """The upload's purpose, read from the start of its body (clients send the form's
    fields before its file), and a request that still gives the whole body."""
    stream = request.stream()
    head: list[bytes] = []
    async for chunk in stream:
        head.append(chunk)
        if sum(map(len, head)) >= PEEK_BYTES or b'name="file"' in b"".join(head):
            break
    found = re.search(rb'name="purpose"\r\n\r\n([^\r]*)\r\n', b"".join(head))

    async def receive() -> dict[str, Any]:
        if head:
            return {"type": "http.request", "body": head.pop(0), "more_body": True}
        try:
            return {"type": "http.request", "body": await anext(stream), "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    return Request(request.scope, receive), found.group(1).decode() if found else None


def _auth_failure(request: Request, api_key: str | None) -> JSONResponse | None:
    """401 unless the key is the bearer token or the face's own key header."""
    if api_key is None or request.headers.get("authorization") == f"Bearer {api_key}":
        return None
    dialect = request.scope.get(DIALECT, "openai")
    if dialect == "gemini" and "upload_id" in request.query_params:
        return None  # a resumable upload's URL, given by a call with the key, is its key
    if request.headers.get(KEY_HEADERS.get(dialect, "")) == api_key:
        return None
    error = APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                     type_="authentication_error" if dialect == "anthropic"
                     else "invalid_request_error")
    return JSONResponse(error.body(dialect), status_code=401)


def _expires_after(anchor: Any, seconds: Any) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise APIError(400, "expires_after[anchor] must be 'created_at'.",
                       param="expires_after.anchor")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = -1
    if not 3600 <= value <= 2_592_000:
        raise APIError(400, "expires_after[seconds] must be between 3600 and 2592000.",
                       param="expires_after.seconds")
    return value


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "localbatch"}


def _page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def _raise(error: APIError):
    raise error
