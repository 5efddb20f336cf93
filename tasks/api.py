"""What is worth retrying when the API answers badly: one rule for every task."""

from __future__ import annotations

from collections.abc import Callable

import openai

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
