"""enrichflow: enrich tables with LLMs through the providers' batch APIs, orchestrated by
Prefect. The Python API (`enrichflow.api`) is loaded on first use, so that the command
line and the steps below it do not pay for it."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# Arrow's memory pool is chosen when pyarrow loads: jemalloc, where pyarrow has it and the
# user has not chosen. pyarrow's default, mimalloc, keeps much of what each shard's render
# and collect free: a run of 1,000,000 rows peaked at 878 MiB with it, 759 MiB with
# jemalloc (bench/memory_phases.py). Set here, before the steps import pyarrow; the
# processes a run starts (Dask workers, the local server's worker) inherit it.
if sys.platform != "win32":  # Windows wheels have no jemalloc
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

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
