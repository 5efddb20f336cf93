"""Shared fixtures and helpers: real servers on loopback, job files, job processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pandas as pd

# Prefect sets its console logging up on this import: here, on the session's stderr (set
# up within a test that captures stderr, it would write to a stream closed after it)
import prefect.main  # noqa: F401
import pyarrow as pa
import pytest
import yaml
from openai import OpenAI

from enrichflow.config import set_field
from enrichflow.storage import Location
from localbatch import LocalBatchServer, Simulation

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
TERMINAL = {"completed", "failed", "expired", "cancelled"}
REPO = Path(__file__).resolve().parent.parent


ENRICHFLOW = str(Path(sys.executable).with_name("enrichflow"))  # the CLI, as a user types it


def eventually(check, timeout: float = 120, every: float = 1):
    """The first true value of check(), within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{check.__name__} did not happen in {timeout}s"
        time.sleep(every)
    return value


def ledger_tokens(api_url: str, name: str) -> tuple[int, int | None]:
    """(tokens held, the limit) of the enqueued-token ledger `name` on the Prefect server
    at `api_url`; (0, None) before any run made it."""
    found = httpx.get(f"{api_url}/v2/concurrency_limits/{name}", timeout=60)
    if found.status_code == 404:
        return 0, None
    found.raise_for_status()
    return found.json()["active_slots"], found.json()["limit"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_file(tmp_path: Path, rows: pd.DataFrame | None = None, config: str = "movies",
             canary: bool = False, **changes) -> Path:
    """A copy of a shipped job (configs/<config>.yaml) writing under tmp_path, optionally
    on other rows; `changes` set dotted fields (`limits.max_attempts=2`). The shipped
    jobs answer a canary sample first; the copy leaves it out unless `canary`, so that
    tests of the batches see every row go through them (tests/test_canary.py keeps it)."""
    job = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())
    if not canary:
        job.pop("canary", None)
    job["dataset"]["path"] = str(REPO / job["dataset"]["path"])
    if rows is not None:
        job["dataset"]["path"] = str(tmp_path / "rows.csv")
        rows.to_csv(job["dataset"]["path"], index=False)
    job["output"] = str(tmp_path / "out")
    job.setdefault("limits", {}).update(poll_interval_min=0.1, poll_interval_max=0.5)
    for dotted, value in changes.items():
        set_field(job, dotted, value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def read_all(source) -> pa.Table:
    """Every row of a dataset (`enrichflow.tasks.load.Source`), as one table."""
    return pa.Table.from_batches(list(source.batches()))


def generated_movies(count: int) -> pd.DataFrame:
    return pd.DataFrame({
        "Series_Title": [f"Movie number {i}" for i in range(count)],
        "Released_Year": [1950 + i % 70 for i in range(count)],
        "Genre": ["Drama, Crime" if i % 2 else "Comedy" for i in range(count)],
        "Overview": [f"A story numbered {i} about \"quotes\", newlines\nand ünïcode."
                     for i in range(count)],
    })


def start_job(command: list[str], prefect_api: str, unset: tuple[str, ...] = (),
              env_extra: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """A job in its own process (`enrichflow ...` or `python -m ...`), on the test's
    Prefect server, so that the test can kill it; without the variables in `unset`,
    with those of `env_extra`."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, **(env_extra or {})}
    for name in ("OPENAI_API_KEY", *unset):
        env.pop(name, None)
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(command, cwd=REPO, env=env, **popen)


def python_job(path: Path, base_url: str, prefect_api: str) -> subprocess.Popen:
    return start_job([sys.executable, "-m", "enrichflow", "run", str(path), "--base-url", base_url],
                     prefect_api)


def wait_for_batches(run: subprocess.Popen, read_journal: Callable[[], dict | None],
                     shards: int, timeout: float = 120) -> dict:
    """The run's journal once it holds `shards` shards that all have a batch (the
    canary, journaled as shard -1, is not one of them)."""
    deadline = time.monotonic() + timeout
    while True:
        assert run.poll() is None, "the run ended before its batches were all created"
        assert time.monotonic() < deadline, "the run never created its batches"
        journal = read_journal() or {"shards": []}
        sent = [s for s in journal["shards"] if s["shard"] >= 0]
        if len(sent) == shards and all(s["batch_id"] for s in sent):
            return journal
        time.sleep(0.1)


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


def collected(lines: list[dict], request, tmp_path: Path,
              custom_ids: list[str] | None = None) -> list[dict]:
    """The results collect makes of a batch's output `lines` (of batch `batch_x`) for the
    rows of `custom_ids` (by default, the lines' own)."""
    from enrichflow.tasks.collect import read_result_lines, results_of_lines

    path = tmp_path / "output.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ids = custom_ids or [line["custom_id"] for line in lines]
    return results_of_lines(read_result_lines(str(path), request.endpoint), "batch_x",
                            pa.array(range(len(ids)), pa.int64()), pa.array(ids),
                            request).to_pylist()


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
    from moto.server import ThreadedMotoServer

    port = free_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[name] = value
    make_conditional_puts_atomic()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


CONFLICT = (409, {}, "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>"
            "ConditionalRequestConflict</Code><Message>A conflicting operation occurred. "
            "If using PutObject you can retry the request.</Message></Error>")
CONDITIONAL_PUT_IN_FLIGHT = threading.Lock()


def make_conditional_puts_atomic() -> None:
    """Give moto's server S3's conditional puts. S3 checks `If-Match`/`If-None-Match`
    and writes in one step: of concurrent conditional writes of an object one wins, and
    the others are answered 412, or 409 ConditionalRequestConflict while it is in flight.
    moto checks and then writes, so two puts judged against the same ETag can both
    succeed (seen as two runs holding one lease); here a conditional put meeting another
    one in flight is answered 409, as S3 may."""
    from moto.s3.responses import S3Response

    put_object = S3Response.put_object
    if getattr(put_object, "atomic", False):
        return

    def put_object_atomically(response: S3Response):
        if not (response.headers.get("If-Match") or response.headers.get("If-None-Match")):
            return put_object(response)
        if not CONDITIONAL_PUT_IN_FLIGHT.acquire(blocking=False):
            return CONFLICT
        try:
            return put_object(response)
        finally:
            CONDITIONAL_PUT_IN_FLIGHT.release()

    put_object_atomically.atomic = True
    S3Response.put_object = put_object_atomically


@pytest.fixture
def conditional_put_in_flight(s3_endpoint) -> threading.Lock:
    """Held, it is another writer's conditional put in flight on the S3 endpoint."""
    return CONDITIONAL_PUT_IN_FLIGHT


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> Location:
    """An output location on local disk, then one in a bucket of its own on S3."""
    if request.param == "local":
        return Location(str(tmp_path / "out"))
    return request.getfixturevalue("s3_location")


@pytest.fixture
def s3_location(s3, s3_endpoint) -> Location:
    bucket = f"out-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)
    return Location(f"s3://{bucket}/out", {"endpoint_url": s3_endpoint})


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the loopback endpoint that never answers from a stale cache."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, use_listings_cache=False,
                             skip_instance_cache=True)
