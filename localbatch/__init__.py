"""A local, OpenAI-compatible Files + Batches API server: the embedded default backend."""

from localbatch.server import DEFAULT_PORT, URL_FILE, LocalBatchServer
from localbatch.simulation import HttpFault, Simulation

__all__ = ["DEFAULT_PORT", "URL_FILE", "HttpFault", "LocalBatchServer", "Simulation"]
