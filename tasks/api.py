"""What is worth retrying when the API answers badly (one rule for every task), and how
an error that outlasted its retries is told to the user."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import openai

from enrichflow.errors import ConfigError

TRANSIENT = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
             openai.InternalServerError, openai.ConflictError)


def retry_on(*exceptions: type[BaseException]) -> Callable[..., bool]:
    """A Prefect `retry_condition_fn` that retries only the given exceptions."""

    def condition(_task, _task_run, state) -> bool:
        try:
            state.result()
        except exceptions:
            return True
        except Exception:
            return False
        return False

    return condition


_HINTS = {
    401: "check the API key: OPENAI_API_KEY, or LOCALBATCH_API_KEY for an `enrichflow serve` "
         "started with --api-key",
    403: "the key may not use this model or endpoint",
    404: "the batch or file is gone: was the job started with another --base-url?",
    413: "the file is larger than the provider takes: lower limits.max_bytes_per_shard",
    429: "the provider's rate or quota limit: run the job again later; it re-attaches",
}


def describe_api_error(exc: openai.APIError) -> str:
    """One line: the call, the HTTP status and the provider's message, and what to do."""
    request = exc.request
    call = f"{request.method} {request.url}"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.message
        hint = _HINTS.get(exc.status_code, "the provider is in trouble: run the job again "
                          "later; it re-attaches to what was already created")
        return f"the API call {call} failed: HTTP {exc.status_code}: {message} ({hint})"
    return (f"the API call {call} failed: {exc.message} (is the server at that address "
            "up? running the job again re-attaches to what was already created)")


def check_model(client: openai.OpenAI, model: str, kind: str) -> None:
    """Refuse, before anything is uploaded, a model the provider does not have (a typo
    in a job file would otherwise be a batch of failed requests), with the closest one.
    A server that lists no models (some OpenAI-compatible ones) cannot tell: no check;
    nor can Azure, whose `model` is a deployment's name, which /models does not list."""
    if kind == "azure":
        return
    try:
        client.models.retrieve(model)
        return
    except openai.NotFoundError:
        try:
            names = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            return
    if not names or model in names:
        return
    close = difflib.get_close_matches(model, names, n=1)
    raise ConfigError(f"request.model: {client.base_url} has no model {model!r}"
                      + (f"; did you mean {close[0]!r}?" if close else "")
                      + " Nothing was sent")
