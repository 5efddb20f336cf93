"""A local, OpenAI-compatible Files + Batches API server: the embedded default backend.
The server (FastAPI, uvicorn) is loaded on first use, so that what only needs the limits
and the engines' facts (a job's validation) does not pay for it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from localbatch.simulation import HttpFault, Simulation

if TYPE_CHECKING:
    from localbatch.server import DEFAULT_PORT, URL_FILE, LocalBatchServer

__all__ = ["DEFAULT_PORT", "URL_FILE", "HttpFault", "LocalBatchServer", "Simulation"]


def __getattr__(name: str) -> Any:
    if name in ("DEFAULT_PORT", "URL_FILE", "LocalBatchServer"):
        return getattr(importlib.import_module("localbatch.server"), name)
    raise AttributeError(f"module 'localbatch' has no attribute {name!r}")
