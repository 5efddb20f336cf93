"""Concurrent jobs under one enqueued-token limit: refused batches and queue utilisation.

1, 2 and 4 movies jobs are started at once (each `enrichflow run` in its own process, as
a schedule and a colleague would), against one localbatch server whose enqueued-token
limit holds four of their shards and whose batches take about 25 seconds. Each count runs
twice, on a fresh server each time:
- per run: no Prefect server is named, so each run budgets the whole limit for itself
  (what every run did before the ledger, and still does without a Prefect server);
- shared: the runs use one Prefect server (services on), so they share its ledger.

Figures, from the server's batch records (the SDK's batch list and result files):
refused batches (`token_limit_exceeded`), queue utilisation (the time integral of the
prompt tokens of unfinished batches, over the limit times the span from the first batch
created to the last one finished), wall time; every row is checked to be in its output
once and `ok`. Goal for shared: 0 refused and utilisation at least 0.85.

    .venv/bin/python bench/shared_budget.py [--jobs 1,2,4] [--rows 800]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import yaml
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data"))
from make_movies import main as make_movies  # noqa: E402

from enrichflow.config import load_job  # noqa: E402
from enrichflow.tasks.budget import MARGIN  # noqa: E402
from enrichflow.tasks.prepare import prepare_job  # noqa: E402

BIN = Path(sys.executable).parent
SHARD_ROWS = 100
SHARDS_AT_ONCE = 4  # what the limit holds
REQUESTS_PER_SECOND = 4  # per batch: a shard's batch takes about 25 s, long beside the
# seconds a run takes to see that a batch ended and to upload the next (real batches take
# minutes to hours), short enough for the bench to end in minutes
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_up(url: str, process: subprocess.Popen, what: str) -> None:
    """Until `url` answers (any status: localbatch's want a key)."""
    deadline = time.monotonic() + 180
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)


@contextmanager
def localbatch(work: Path, limit: int) -> Iterator[str]:
    """A fresh localbatch server with the enqueued-token limit and the pace; its base URL."""
    port = free_port()
    config = work / f"localbatch-{port}.yaml"
    config.write_text(yaml.safe_dump({"enqueued_token_limits": {"gpt-4o-mini": limit},
                                      "requests_per_second": REQUESTS_PER_SECOND}))
    server = subprocess.Popen([BIN / "enrichflow", "serve", "--port", str(port), "--data-dir",
                               str(work / f"localbatch-{port}"), "--config", str(config),
                               "--api-key", KEY], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{port}/v1/models", server, "localbatch")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait()


@contextmanager
def prefect_server(work: Path) -> Iterator[str]:
    """A Prefect server with its services on (the repossessor gives back expired leases)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-ui"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_up(f"{url}/health", server, "the Prefect server")
        yield url
    finally:
        server.terminate()
        server.wait()


def write_job(work: Path, name: str, data: Path, limit: int) -> Path:
    job = yaml.safe_load((REPO / "configs" / "movies.yaml").read_text())
    job.pop("canary", None)  # the batches are what is measured
    job["dataset"]["path"] = str(data)
    job["output"] = str(work / name)
    job["cleanup"] = False  # the result files give each batch's tokens
    job.setdefault("limits", {}).update(
        max_requests_per_shard=SHARD_ROWS, enqueued_token_budget=limit,
        poll_interval_min=0.2, poll_interval_max=1.0)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_jobs(jobs: list[Path], base_url: str, prefect_url: str | None) -> float:
    """Start every job at once; the seconds until the last one ended."""
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    env.pop("PREFECT_API_URL", None)
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    started = time.perf_counter()
    runs = [subprocess.Popen([BIN / "enrichflow", "run", str(path), "--base-url", base_url,
                              "--force", "--no-cache"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for path in jobs]
    for path, run in zip(jobs, runs, strict=True):
        output = run.communicate()[0]
        if run.returncode:
            raise RuntimeError(f"{path.name} failed:\n{output[-3000:]}")
    return time.perf_counter() - started


def queue_figures(base_url: str, limit: int) -> tuple[int, float, int]:
    """(refused batches, queue utilisation, batches) from the server's batch records."""
    client = OpenAI(base_url=base_url, api_key=KEY)
    batches = list(client.batches.list(limit=100))
    refused = [b for b in batches if b.status == "failed" and b.errors and b.errors.data
               and b.errors.data[0].code == "token_limit_exceeded"]
    held = 0.0
    done = [b for b in batches if b.status == "completed"]
    for batch in done:
        lines = client.files.content(batch.output_file_id).text.splitlines()
        tokens = sum(json.loads(line)["response"]["body"]["usage"]["prompt_tokens"]
                     for line in lines)
        held += tokens * (batch.completed_at - batch.created_at)
    span = max(b.completed_at for b in done) - min(b.created_at for b in done)
    return len(refused), held / (limit * span), len(batches)


def check_outputs(jobs: list[Path], rows: int) -> None:
    for path in jobs:
        data = pd.read_parquet(yaml.safe_load(path.read_text())["output"])
        assert len(data) == rows and data["Series_Title"].is_unique, path
        assert (data["_status"] == "ok").all(), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,2,4", help="counts of concurrent jobs")
    parser.add_argument("--rows", type=int, default=800,
                        help="rows per job (8 shards: two full waves of 4)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="shared-budget-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"movies-{args.rows}.csv"
    make_movies([str(args.rows), str(data)])
    shards = prepare_job(load_job(write_job(work, "probe", data, 10**9))).shards
    largest = max(shard.tokens for shard in shards)
    limit = math.ceil(SHARDS_AT_ONCE * largest / (1 - MARGIN)) + 1
    print(f"{args.rows:,} rows a job in shards of {SHARD_ROWS} (at most {largest:,} tokens); "
          f"limit {limit:,} tokens ({SHARDS_AT_ONCE} shards and the {MARGIN:.0%} margin, so "
          f"utilisation is at most {1 - MARGIN:.2f}); batches ~"
          f"{SHARD_ROWS / REQUESTS_PER_SECOND:.0f} s")
    print(f"{'jobs':>4} {'budget':>8} {'refused':>8} {'batches':>8} {'utilisation':>12} "
          f"{'wall s':>7}")
    with prefect_server(work) as prefect_url:
        for count in (int(n) for n in args.jobs.split(",")):
            for mode, url in (("per run", None), ("shared", prefect_url)):
                jobs = [write_job(work, f"{mode.replace(' ', '-')}-{count}-{i}", data, limit)
                        for i in range(count)]
                with localbatch(work, limit) as base_url:
                    wall = run_jobs(jobs, base_url, url)
                    refused, utilisation, batches = queue_figures(base_url, limit)
                check_outputs(jobs, args.rows)
                print(f"{count:>4} {mode:>8} {refused:>8} {batches:>8} {utilisation:>12.2f} "
                      f"{wall:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
