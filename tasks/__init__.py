"""The steps of a job: plain functions, each also wrapped as a Prefect task."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect import Task


def as_task(fn: Callable[..., Any], name: str, **options: Any) -> Task:
    """Wrap a step as a Prefect task. Steps take Arrow tables and API clients, so their
    inputs are not hashed for caching and their results not persisted: the run journal in
    `<output>/_state/` is what a resumed run continues from. Prefect is imported here, by
    the steps that are tasks, not by the plain steps the pre-flight uses."""
    from prefect import task
    from prefect.cache_policies import NONE

    return task(fn, name=name, cache_policy=NONE, persist_result=False, **options)
