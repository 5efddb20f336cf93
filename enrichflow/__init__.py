"""enrichflow: enrich tables with LLMs through the providers' batch APIs, orchestrated by
Prefect. The Python API (`enrichflow.api`) is loaded on first use, so that the command
line and the steps below it do not pay for it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from enrichflow.api import (
        Interrupted,
        Result,
        cancel,
        enrich,
        estimate,
        make_job,
        preview,
        run,
        status,
        workdirs,
    )
    from enrichflow.config import Job

__all__ = ["Interrupted", "Job", "Result", "cancel", "enrich", "estimate", "make_job",
           "preview", "run", "status", "workdirs"]


def __getattr__(name: str) -> Any:
    if name == "Job":
        from enrichflow.config import Job

        return Job
    if name in __all__:
        return getattr(importlib.import_module("enrichflow.api"), name)
    raise AttributeError(f"module 'enrichflow' has no attribute {name!r}")
