"""What is worth retrying when a provider's API answers badly (one rule for every task
and every provider's SDK), and how an error that outlasted its retries is told."""

from __future__ import annotations

import sys
from typing import Any


def sdk_errors() -> tuple[type[Exception], ...]:
    """The base error of each provider SDK this process loaded (one not loaded raised
    nothing: Anthropic's SDK is imported only by a job on Anthropic)."""
    import openai

    loaded = sys.modules.get("anthropic")
    return (openai.APIError,) + ((loaded.APIError,) if loaded else ())


def transient_errors() -> tuple[type[Exception], ...]:
    """The errors worth another try, of each provider SDK this process loaded."""
    from enrichflow.providers.openai_batches import TRANSIENT

    if "anthropic" not in sys.modules:
        return TRANSIENT
    from enrichflow.providers.anthropic_batches import TRANSIENT as ANTHROPIC_TRANSIENT

    return TRANSIENT + ANTHROPIC_TRANSIENT


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
    401: "check the API key: OPENAI_API_KEY, AZURE_OPENAI_API_KEY or ANTHROPIC_API_KEY as "
         "the provider is, or LOCALBATCH_API_KEY for an `enrichflow serve` started with "
         "--api-key",
    403: "the key may not use this model or endpoint",
    404: "the batch or file is gone: was the job started with another --base-url?",
    413: "the batch is larger than the provider takes: lower limits.max_bytes_per_shard",
    429: "the provider's rate or quota limit: run the job again later; it re-attaches",
}


def describe_api_error(exc: Exception) -> str:
    """One line: the call, the HTTP status and the provider's message, and what to do
    (an error of any SDK in `sdk_errors`: they share their shape)."""
    request = exc.request
    call = f"{request.method} {request.url}"
    status = getattr(exc, "status_code", None)
    if status is not None:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = (body.get("message") or (body.get("error") or {}).get("message")
                   or exc.message)
        hint = _HINTS.get(status, "the provider is in trouble: run the job again later; it "
                          "re-attaches to what was already created")
        return f"the API call {call} failed: HTTP {status}: {message} ({hint})"
    return (f"the API call {call} failed: {exc.message} (is the server at that address "
            "up? running the job again re-attaches to what was already created)")
