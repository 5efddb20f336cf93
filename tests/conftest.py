"""Shared fixtures: real local servers on loopback, driven with the official SDK."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator

import pytest
from openai import OpenAI

from localbatch import LocalBatchServer, Simulation

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture
def start_localbatch(tmp_path_factory) -> Iterator[Callable[..., LocalBatchServer]]:
    """Start local Batch API servers (each in its own data folder); all stop at teardown."""
    servers: list[LocalBatchServer] = []

    def start(simulation: Simulation | None = None, **kwargs) -> LocalBatchServer:
        data_dir = kwargs.pop("data_dir", None) or tmp_path_factory.mktemp("localbatch")
        server = LocalBatchServer(data_dir, simulation=simulation, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def sdk_client(base_url: str, api_key: str = "test-key", **kwargs) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=api_key, _strict_response_validation=True,
                  **kwargs)


def chat_line(custom_id: str, text: str, model: str = "gpt-4o-mini", **body) -> str:
    return json.dumps({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    })


def wait_until(client: OpenAI, batch_id: str, statuses=TERMINAL, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")
        time.sleep(0.05)


def read_jsonl(client: OpenAI, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server (SQLite) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on loopback (moto's server mode), as s3fs's own tests use."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[name] = value
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the loopback endpoint that never answers from a stale cache."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, use_listings_cache=False,
                             skip_instance_cache=True)
