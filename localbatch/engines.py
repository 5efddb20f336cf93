"""Engines answer single API requests; the batch lifecycle and the sync routes both use them.

`MockEngine` answers from the request's own text, deterministically and offline.
`ForwardEngine` sends requests to any OpenAI-compatible upstream server.
Both return `(status_code, body)` pairs; an error body uses OpenAI's envelope.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
import re
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import httpx

from localbatch.tokens import (
    embedding_inputs,
    image_parts,
    message_text,
    prompt_tokens,
    responses_input_text,
    text_tokens,
)

MOCK_FINGERPRINT = "fp_localbatch_mock"
CHAT_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"
RESPONSES_URL = "/v1/responses"
COMPLETIONS_URL = "/v1/completions"
MODERATIONS_URL = "/v1/moderations"
BATCH_ENDPOINTS = frozenset({  # what OpenAI's Batch API takes
    RESPONSES_URL, CHAT_URL, EMBEDDINGS_URL, COMPLETIONS_URL, MODERATIONS_URL,
})
MODERATION_CATEGORIES = {  # category: the input types it applies to
    "harassment": ["text"], "harassment/threatening": ["text"], "hate": ["text"],
    "hate/threatening": ["text"], "illicit": ["text"], "illicit/violent": ["text"],
    "self-harm": ["text"], "self-harm/instructions": ["text"], "self-harm/intent": ["text"],
    "sexual": ["text"], "sexual/minors": ["text"], "violence": ["text"],
    "violence/graphic": ["text"],
}
# The length of OpenAI's embedding models' vectors when a request gives no `dimensions`,
# and the most it may ask for.
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
                        "text-embedding-ada-002": 1536}
MOCK_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini",
               "o3", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-3.5-turbo-instruct",
               "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002",
               "omni-moderation-latest", "text-moderation-latest",
               # Anthropic's, answered on its face (`localbatch.anthropic`)
               "claude-haiku-4-5", "claude-sonnet-4-6", "claude-opus-4-8", "claude-sonnet-5",
               "claude-opus-5",
               # Google's, answered on its face (`localbatch.gemini`)
               "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro"]
SNAPSHOT_DATE = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # gpt-4o-2024-08-06 is a gpt-4o

Result = tuple[int, dict[str, Any]]
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Engine(Protocol):
    name: str

    def run(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Result]:
        """Answer each `(url, body)` in order."""
        ...

    def models(self) -> list[str]:
        """The models it answers for (`GET /v1/models`)."""
        ...

    def knows(self, model: str) -> bool:
        """Whether it answers for `model` (`GET /v1/models/{model}`)."""
        ...


class MockEngine:
    """Deterministic answers derived from the request, marked as mock in `system_fingerprint`.

    The rules, so that a test can predict an answer: the *words* are the runs of letters
    and digits in the user messages' text. A JSON-schema answer fills every property:
    strings with the first 12 words, arrays of strings with distinct lower-cased words of
    four letters or more (three items unless the schema bounds say otherwise), enums with
    the option picked by a hash of the text, numbers with the word count, booleans with
    whether that count is even. A text answer is `Mock answer: ` and the first 30 words.
    The same holds for Responses (`text.format`) and Completions (text); a moderation
    flags `violence` when its input holds the word "attack".
    """

    name = "mock"

    def __init__(self, models: list[str] | None = None):
        self._models = MOCK_MODELS + [m for m in models or [] if m not in MOCK_MODELS]

    def run(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Result]:
        return [self.answer(url, body) for url, body in requests]

    def models(self) -> list[str]:
        """The OpenAI models whose requests it imitates, and the simulation's `models`."""
        return self._models

    def knows(self, model: str) -> bool:
        """As OpenAI: a model it has, or a dated snapshot of one; any other name is a
        404 `model_not_found` (a typo in a job file is refused, not answered)."""
        return model in self._models or SNAPSHOT_DATE.sub("", model) in self._models

    def answer(self, url: str, body: dict[str, Any]) -> Result:
        """The answer to one request; a malformed body is a 400 of that request alone,
        never an exception that would stall its batch."""
        if url == MODERATIONS_URL and isinstance(body, dict):  # the model is optional there
            body = {"model": "omni-moderation-latest", **body}
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return 400, error_body("you must provide a model parameter", param="model")
        if not self.knows(body["model"]):
            return 404, error_body(f"The model `{body['model']}` does not exist or you do not "
                                   "have access to it.", code="model_not_found")
        problem = _check_types(body)
        if problem:
            return 400, problem
        handlers = {CHAT_URL: self._chat, EMBEDDINGS_URL: self._embeddings,
                    RESPONSES_URL: self._responses, COMPLETIONS_URL: self._completions,
                    MODERATIONS_URL: self._moderations}
        try:
            if url in handlers:
                return handlers[url](body)
        except SchemaError as exc:
            return 400, error_body(f"Invalid schema for {SCHEMA_PARAMS[url]}: {exc}",
                                   param=SCHEMA_PARAMS[url])
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            return 400, error_body(f"Invalid request body: {type(exc).__name__}: {exc}")
        return 400, error_body(f"the mock engine does not serve {url}", param="url",
                               code="unsupported_endpoint")

    def _chat(self, body: dict[str, Any]) -> Result:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, error_body("'messages' must be a non-empty array", param="messages")
        user_text = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                return 400, error_body(f"messages[{i}] needs a role", param=f"messages[{i}]")
            for part in image_parts(message.get("content")):
                problem = _check_image(part)
                if problem:
                    return 400, error_body(problem, param=f"messages[{i}].content",
                                           code="invalid_image")
            if message["role"] == "user":
                user_text.append(message_text(message.get("content")))
        text = " ".join(user_text)
        response_format = body.get("response_format") or {"type": "text"}
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        content, finish_reason = _answer_text(
            text, response_format.get("type"), schema,
            body.get("max_completion_tokens") or body.get("max_tokens"))
        prompt = prompt_tokens(CHAT_URL, body)
        completion = text_tokens(content)
        return 200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],  # every completion its own
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None,
                            "annotations": []},
                "finish_reason": finish_reason,
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": MOCK_FINGERPRINT,
        }

    def _responses(self, body: dict[str, Any]) -> Result:
        """A Responses answer; `text.format` is honoured as chat's `response_format`."""
        text = responses_input_text(body)
        if not text and not isinstance(body.get("input"), list):
            return 400, error_body("'input' must be a string or an array of input items",
                                   param="input")
        fmt = (body.get("text") or {}).get("format") or {"type": "text"}
        content, finish_reason = _answer_text(text, fmt.get("type"), fmt.get("schema") or {},
                                              body.get("max_output_tokens"))
        prompt, completion = prompt_tokens(RESPONSES_URL, body), text_tokens(content)
        created = time.time()
        cut = finish_reason == "length"
        return 200, {
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": created,
            "status": "incomplete" if cut else "completed", "completed_at": created,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
            "model": body["model"], "max_output_tokens": body.get("max_output_tokens"),
            "output": [{
                "id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant",
                "status": "incomplete" if cut else "completed",
                "content": [{"type": "output_text", "text": content, "annotations": [],
                             "logprobs": []}],
            }],
            "parallel_tool_calls": True, "temperature": body.get("temperature", 1.0),
            "tool_choice": "auto", "tools": [], "top_p": body.get("top_p", 1.0),
            "text": {"format": fmt}, "truncation": "disabled", "service_tier": "default",
            "usage": {
                "input_tokens": prompt, "output_tokens": completion,
                "total_tokens": prompt + completion,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def _completions(self, body: dict[str, Any]) -> Result:
        prompt_text = body.get("prompt")
        if not isinstance(prompt_text, str):
            return 400, error_body("'prompt' must be a string", param="prompt")
        content, finish_reason = _answer_text(prompt_text, "text", {}, body.get("max_tokens"))
        prompt, completion = prompt_tokens(COMPLETIONS_URL, body), text_tokens(content)
        return 200, {
            "id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
            "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "text": content, "finish_reason": finish_reason,
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
            "system_fingerprint": MOCK_FINGERPRINT,
        }

    def _moderations(self, body: dict[str, Any]) -> Result:
        """Each input flagged for `violence` when it holds the word "attack", else not."""
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs:
            return 400, error_body("'input' must be a string or a non-empty array",
                                   param="input")
        results = []
        for item in inputs:
            text = item if isinstance(item, str) else message_text([item])
            violent = "attack" in _WORD.findall(text.lower())
            results.append({
                "flagged": violent,
                "categories": {c: violent and c == "violence" for c in MODERATION_CATEGORIES},
                "category_scores": {c: 0.9 if violent and c == "violence" else 0.0001
                                    for c in MODERATION_CATEGORIES},
                "category_applied_input_types": MODERATION_CATEGORIES,
            })
        return 200, {"id": "modr-" + uuid.uuid4().hex[:24], "model": body["model"],
                     "results": results}

    def _embeddings(self, body: dict[str, Any]) -> Result:
        inputs = embedding_inputs(body.get("input"))
        if not inputs:
            return 400, error_body("'input' must be a string or a non-empty array", param="input")
        dims = body.get("dimensions") or EMBEDDING_DIMENSIONS.get(body["model"], 1536)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _unit_vector(json.dumps(item), int(dims))
            if as_base64:
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding: Any = base64.b64encode(packed).decode()
            else:
                embedding = vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = prompt_tokens(EMBEDDINGS_URL, body)
        return 200, {"object": "list", "data": data, "model": body["model"],
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


_TYPED = {"max_tokens": int, "max_completion_tokens": int, "n": int, "seed": int,
          "dimensions": int, "response_format": dict, "messages": list,
          "temperature": (int, float), "top_p": (int, float)}
MAX_DIMENSIONS = 3072  # text-embedding-3-large, the widest OpenAI embedding
FIXED_DIMENSIONS = {"text-embedding-ada-002"}  # refuses `dimensions`


def _check_types(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 for a parameter of the wrong type (e.g. max_tokens "10") or size."""
    for name, kind in _TYPED.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            expected = {int: "an integer", dict: "an object", list: "an array"}.get(
                kind, "a number")
            return error_body(f"Invalid type for '{name}': expected {expected}, but got "
                              f"{type(value).__name__} instead.", param=name,
                              code="invalid_type")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        model = SNAPSHOT_DATE.sub("", str(body.get("model")))
        if model in FIXED_DIMENSIONS:
            return error_body("This model does not support specifying dimensions.",
                              param="dimensions", code="invalid_value")
        most = EMBEDDING_DIMENSIONS.get(model, MAX_DIMENSIONS)
        if not 1 <= dimensions <= most:
            return error_body(f"Invalid 'dimensions': {dimensions}; it must be from 1 to "
                              f"{most}.", param="dimensions", code="invalid_value")
    return _check_parts(body)


def _check_parts(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 for a text part whose text is not a string (`"text": null`)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        items = body.get("input")
        messages = items if isinstance(items, list) else []
        name = "input"
    else:
        name = "messages"
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") in ("text", "input_text") and \
                    not isinstance(part.get("text"), str):
                got = "null" if part.get("text") is None else type(part["text"]).__name__
                where = f"{name}[{i}].content[{j}].text"
                return error_body(f"Invalid type for '{where}': expected a string, but got "
                                  f"{got} instead.", param=where, code="invalid_type")
    return None


def _check_image(part: dict[str, Any]) -> str | None:
    """Why an image part is unusable, or None; remote URLs are accepted without fetching."""
    url = (part.get("image_url") or {}).get("url")
    if not isinstance(url, str) or not url:
        return "image_url.url is missing"
    if url.startswith(("http://", "https://")):
        return None
    if not url.startswith("data:"):
        return f"image_url.url must be an http(s) URL or a data: URL, not {url[:40]!r}"
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        return "a data: URL image must be data:image/...;base64,..."
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return "the data: URL image is not valid base64"
    return None


def _answer_text(text: str, kind: str | None, schema: dict[str, Any],
                 limit: int | None) -> tuple[str, str]:
    """(content, finish reason) of a mock answer to `text`: an object that fits `schema`
    for `json_schema`, a small object for `json_object`, else `Mock answer: ` and the
    first 30 words, cut to `limit` tokens (finish reason `length`)."""
    words = _WORD.findall(text)
    if kind == "json_schema":
        return json.dumps(_fill(schema, schema, text, words), ensure_ascii=False), "stop"
    if kind == "json_object":
        return json.dumps({"answer": " ".join(words[:12])}, ensure_ascii=False), "stop"
    answer_words = ["Mock", "answer:", *words[:30]]
    finish_reason = "stop"
    if limit and text_tokens(" ".join(answer_words)) > limit:
        while answer_words and text_tokens(" ".join(answer_words)) > limit:
            answer_words.pop()
        finish_reason = "length"
    return " ".join(answer_words), finish_reason


def _unit_vector(text: str, dims: int) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


class SchemaError(ValueError):
    """A response schema no answer can be made for: a request's 400, not its batch's."""


SCHEMA_PARAMS = {CHAT_URL: "response_format", RESPONSES_URL: "text.format"}
MAX_REF_HOPS = 32  # a `$ref` that leads to `$ref`s this many times leads back to itself


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    for _ in range(MAX_REF_HOPS):
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#"):
            return node
        target: Any = root
        for key in filter(None, ref[1:].split("/")):
            target = target.get(key, {}) if isinstance(target, dict) else {}
        node = target
    raise SchemaError(f"$ref {node.get('$ref')!r} leads back to itself, never to a schema")


MAX_FILL_DEPTH = 4  # past it, arrays get their fewest items and optional values null
MAX_NESTING = 10  # OpenAI's limit of nesting levels in a structured-output schema


def _fill(node: dict[str, Any], root: dict[str, Any], text: str, words: list[str],
          index: int = 0, depth: int = 0) -> Any:
    """A value valid against the JSON-schema `node`, derived from the request text. A
    recursive schema ends where it may (an empty array, a null); one that may not
    nests past MAX_NESTING: a SchemaError, as OpenAI refuses such a schema."""
    if depth > MAX_NESTING:
        raise SchemaError(f"it nests more than {MAX_NESTING} levels deep (a $ref to an "
                          "enclosing schema that is required, with no null or empty-array "
                          "way out?)")
    node = _resolve(node, root)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        return node["enum"][(digest + index) % len(node["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        if key not in node:
            continue
        options = [o for o in node[key] if _resolve(o, root).get("type") != "null"]
        if options and depth >= MAX_FILL_DEPTH and len(options) < len(node[key]):
            return None
        if options:
            return _fill(options[0], root, text, words, index, depth)
    kind = node.get("type", "object" if "properties" in node else "string")
    if isinstance(kind, list):
        kind = "null" if depth >= MAX_FILL_DEPTH and "null" in kind else next(
            (k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: _fill(sub, root, text, words, i, depth + 1)
                for i, (name, sub) in enumerate((node.get("properties") or {}).items())}
    if kind == "array":
        count = max(node.get("minItems", 0), min(3, node.get("maxItems", 3)))
        if depth >= MAX_FILL_DEPTH:
            count = node.get("minItems", 0)
        item_schema = node.get("items") or {"type": "string"}
        if _resolve(item_schema, root).get("type", "string") == "string" and \
                "enum" not in _resolve(item_schema, root):
            return _distinct_words(words, count)
        return [_fill(item_schema, root, text, words, i, depth + 1) for i in range(count)]
    if kind in ("integer", "number"):
        value = len(words)
        if "minimum" in node:
            value = max(value, node["minimum"])
        if "maximum" in node:
            value = min(value, node["maximum"])
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return len(words) % 2 == 0
    if kind == "null":
        return None
    value = " ".join(words[:12]) or "mock"
    value = value[: node.get("maxLength", len(value))]
    return value.ljust(node.get("minLength", 0), ".")


def _distinct_words(words: list[str], count: int) -> list[str]:
    chosen: list[str] = []
    for word in words:
        lower = word.lower()
        if len(lower) >= 4 and lower not in chosen:
            chosen.append(lower)
        if len(chosen) == count:
            return chosen
    chosen += [f"item{i}" for i in range(len(chosen), count)]
    return chosen


class ForwardEngine:
    """Sends each request to an upstream OpenAI-compatible server, a bounded pool at a time.

    429 and 5xx answers and connection failures are retried with exponential backoff;
    what still fails becomes that request's error, never the whole batch's.
    """

    name = "forward"

    def __init__(self, upstream_url: str, api_key: str | None = None, concurrency: int = 8,
                 max_attempts: int = 4, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._base = upstream_url.rstrip("/")
        self._client = httpx.Client(headers=headers, timeout=timeout,
                                    limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="forward")
        self._max_attempts = max_attempts

    def run(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Result]:
        return list(self._pool.map(lambda r: self.answer(*r), requests))

    def answer(self, url: str, body: dict[str, Any]) -> Result:
        target = self._base + (url[3:] if url.startswith("/v1/") else url)
        for attempt in range(self._max_attempts):
            last = attempt == self._max_attempts - 1
            try:
                response = self._client.post(target, json=body)
            except httpx.HTTPError as exc:
                if last:
                    return 502, error_body(f"upstream unreachable: {type(exc).__name__}",
                                           type_="server_error", code="upstream_error")
                time.sleep(min(0.5 * 2**attempt, 8))
                continue
            if (response.status_code == 429 or response.status_code >= 500) and not last:
                time.sleep(_retry_delay(response, attempt))
                continue
            try:
                payload = response.json()
            except ValueError:
                payload = error_body(response.text[:500], type_="server_error")
            return response.status_code, payload
        raise AssertionError("unreachable")

    def models(self) -> list[str]:
        """The upstream's models; none when it does not list them."""
        try:
            response = self._client.get(f"{self._base}/models")
            return [m["id"] for m in response.raise_for_status().json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []

    def knows(self, model: str) -> bool:
        """What the upstream lists; any model when it lists none (it answers for itself)."""
        models = self.models()
        return not models or model in models

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    try:
        return min(float(response.headers["retry-after"]), 30.0)
    except (KeyError, ValueError):
        return min(0.5 * 2**attempt, 8.0)
