"""What is worth retrying when a provider's API answers badly (one rule for every task
and every provider's SDK), and how an error that outlasted its retries is told."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

ADAPTERS = ("openai_batches", "anthropic_batches", "gemini_batches")  # of enrichflow.providers


def _loaded_adapters() -> list[ModuleType]:
    """The provider adapters this process loaded (an SDK's errors come only through its
    adapter; Anthropic's and Google's SDKs, seconds to import, only for a job on them)."""
    return [module for name in ADAPTERS
            if (module := sys.modules.get(f"enrichflow.providers.{name}")) is not None]


def sdk_errors() -> tuple[type[Exception], ...]:
    """What a call of each loaded adapter's SDK raises (one not loaded raised nothing)."""
    return tuple(error for adapter in _loaded_adapters() for error in adapter.ERRORS)


def transient_errors() -> tuple[type[Exception], ...]:
    """The errors worth another try, of each loaded adapter's SDK."""
    return tuple(error for adapter in _loaded_adapters() for error in adapter.TRANSIENT)


def retry_transient(_task, _task_run, state) -> bool:
    """A Prefect `retry_condition_fn` that retries only `transient_errors`."""
    try:
        state.result()
    except transient_errors():
        return True
    except Exception:
        return False
    return False


RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30],
                           "retry_condition_fn": retry_transient}

_HINTS = {
    401: "check the API key: OPENAI_API_KEY, AZURE_OPENAI_API_KEY, ANTHROPIC_API_KEY or "
         "GEMINI_API_KEY as the provider is, or LOCALBATCH_API_KEY for an `enrichflow "
         "serve` started with --api-key",
    403: "the key may not use this model or endpoint",
    404: "the batch or file is gone: was the job started with another --base-url?",
    413: "the batch is larger than the provider takes: lower limits.max_bytes_per_shard",
    429: "the provider's rate or quota limit: run the job again later; it re-attaches",
}


def describe_api_error(exc: Exception) -> str:
    """One line: the call, the HTTP status and the provider's message, and what to do
    (an error of any SDK in `sdk_errors`: OpenAI's and Anthropic's share their shape;
    Google's keeps its status in `code` and its request in its response)."""
    response = getattr(exc, "response", None)
    request = getattr(response, "request", None) or exc.request
    call = f"{request.method} {request.url}"
    status = getattr(exc, "status_code", None) or getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    if status is not None:
        body = getattr(exc, "body", None)
        body = body if isinstance(body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or message
        hint = _HINTS.get(status, "the provider is in trouble: run the job again later; it "
                          "re-attaches to what was already created")
        return f"the API call {call} failed: HTTP {status}: {message} ({hint})"
    return (f"the API call {call} failed: {message} (is the server at that address "
            "up? running the job again re-attaches to what was already created)")
