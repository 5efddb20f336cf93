"""Run the local server: in the foreground (`enrichflow serve`) or in a background thread.

`LocalBatchServer` wires the store, the engine, the lifecycle worker and the HTTP app
together. Used as a context manager it starts on a free loopback port and gives its
`base_url`, which is what the flow's default provider and the tests use.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from localbatch.app import create_app
from localbatch.engines import Engine, ForwardEngine, MockEngine
from localbatch.gemini import GEMINI_PATH
from localbatch.lifecycle import Lifecycle
from localbatch.simulation import AZURE_V1_PATH, Simulation
from localbatch.store import Store

DEFAULT_PORT = 8642
URL_FILE = "server.url"  # in the data folder: where the server that holds it answers
log = logging.getLogger("localbatch")


class LocalBatchServer:
    """A local Batch API server over one data folder; one server per folder at a time."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        engine: str = "mock",
        simulation: Simulation | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_url: str | None = None,
        upstream_api_key: str | None = None,
        concurrency: int = 8,
    ):
        self.simulation = simulation or Simulation()
        self.store = Store(data_dir)
        self.engine = _make_engine(engine, upstream_url, upstream_api_key, concurrency,
                                   self.simulation.models)
        self.lifecycle = Lifecycle(self.store, self.engine, self.simulation)
        self.app = create_app(self.lifecycle, api_key)
        self._socket = socket.create_server((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="localbatch-worker",
                                        daemon=True)
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, log_config=None, log_level="warning", access_log=False,
            timeout_graceful_shutdown=1))
        self._http_thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as `base_url`."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def azure_base_url(self) -> str:
        """Its Azure OpenAI face, as a job's `provider.base_url` for `kind: azure`."""
        return f"http://{self.host}:{self.port}{AZURE_V1_PATH}"

    @property
    def anthropic_base_url(self) -> str:
        """Its Anthropic face, as an Anthropic client (or `kind: anthropic`) takes it."""
        return f"http://{self.host}:{self.port}"

    @property
    def gemini_base_url(self) -> str:
        """Its Gemini face, as a `google-genai` client's `http_options.base_url` (or
        `kind: gemini`) takes it."""
        return f"http://{self.host}:{self.port}{GEMINI_PATH}"

    def start(self) -> LocalBatchServer:
        """Serve from background threads; returns once the server answers."""
        (self.store.root / URL_FILE).write_text(self.base_url)
        self._worker.start()
        self._http_thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
            name="localbatch-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._http_thread.is_alive():
                raise RuntimeError("the local Batch API server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until interrupted (Ctrl-C or SIGTERM)."""
        (self.store.root / URL_FILE).write_text(self.base_url)
        self._worker.start()
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._uvicorn.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
        if self._worker.is_alive():
            self._worker.join(timeout=10)
        if isinstance(self.engine, ForwardEngine):
            self.engine.close()
        self.lifecycle.close()
        self._socket.close()
        self.store.close()

    def __enter__(self) -> LocalBatchServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self.lifecycle.tick():  # idle: a batch may come
                self._stop.wait(0.05)


def _make_engine(name: str, upstream_url: str | None, upstream_api_key: str | None,
                 concurrency: int, models: list[str]) -> Engine:
    if name == "mock":
        return MockEngine(models)
    if name == "forward":
        if not upstream_url:
            raise ValueError("the forward engine needs an upstream URL (--upstream-url)")
        return ForwardEngine(upstream_url, upstream_api_key, concurrency)
    raise ValueError(f"unknown engine {name!r}: choose mock or forward")
