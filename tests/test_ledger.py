"""The organisation's enqueued-token ledger (`enrichflow.tasks.ledger`): runs on one Prefect
server share the provider's limit through a global concurrency limit, as users run them
(the CLI, each job in its own process)."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pandas as pd
from conftest import (
    ENRICHFLOW,
    eventually,
    generated_movies,
    job_file,
    ledger_tokens,
    sdk_client,
    start_job,
)

from enrichflow.config import load_job
from enrichflow.tasks.ledger import limit_name
from enrichflow.tasks.prepare import prepare_job
from localbatch import Simulation


def refused(base_url: str) -> list[str]:
    return [b.id for b in sdk_client(base_url).batches.list(limit=100)
            if b.status == "failed" and b.errors.data[0].code == "token_limit_exceeded"]


def test_two_runs_at_once_share_the_token_limit_and_none_is_refused(
        prefect_api, start_localbatch, tmp_path):
    """Two jobs of 6 shards each under a limit that holds two shards: each run alone
    would plan two at a time (four together, refused); sharing the ledger, they hold
    two together, and every row is answered once with no batch refused."""
    rows = generated_movies(120)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    per_shard = prepare_job(load_job(job_file(tmp_path, rows, **{
        "limits.max_requests_per_shard": 20}))).shards[0].tokens
    limit = int(per_shard * 2.5)
    server = start_localbatch(Simulation(enqueued_token_limits={"gpt-4o-mini": limit},
                                         requests_per_second=40))
    jobs = [job_file(tmp_path / name, rows, **{"limits.max_requests_per_shard": 20,
                                                "limits.poll_interval_max": 0.2,
                                                "limits.enqueued_token_budget": limit,
                                                "provider.base_url": server.base_url})
            for name in ("first", "second")]
    runs = [start_job([ENRICHFLOW, "run", str(path)], prefect_api, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
            for path in jobs]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs

    assert refused(server.base_url) == []
    for path in jobs:
        data = pd.read_parquet(path.parent / "out")
        assert len(data) == 120 and (data["_status"] == "ok").all()
    completed = [b for b in sdk_client(server.base_url).batches.list(limit=100)
                 if b.status == "completed"]
    assert sum(b.request_counts.completed for b in completed) == 240
    name = limit_name("local", server.base_url, "gpt-4o-mini")
    assert ledger_tokens(prefect_api, name) == (0, limit), "every token given back"
    assert all("shared with every run on this Prefect server" in out for out in outputs)
    assert any("waits for room" in out for out in outputs)

    # the next job's estimate: its waves at the limit, the queue now, and the turnaround
    # of the batches these runs saw
    estimate = start_job([ENRICHFLOW, "estimate", str(jobs[0]), "--no-cache"], prefect_api,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = estimate.communicate(timeout=120)[0]
    assert estimate.returncode == 0, said
    waves = -(-prepare_job(load_job(jobs[0]), use_cache=False).estimate.input_tokens * 10
              // (9 * limit))
    assert re.search(rf"waves at the enqueued-token limit: +{waves} \({limit:,} tokens a wave",
                     said), said
    assert re.search(rf"in the queue now: +0 tokens of unfinished batches, of a limit of "
                     rf"{limit:,}\n", said), said
    # (two runs writing the turnaround at once may each drop the other's latest)
    assert re.search(r"likely done: +in about .*, the median of the last \d+ batch\(es\)", said)


def test_a_cancelled_run_gives_its_tokens_back(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=0.05))
    path = job_file(tmp_path, generated_movies(6), **{"limits.enqueued_token_budget": 100_000})
    name = limit_name("local", server.base_url, "gpt-4o-mini")
    run = start_job([ENRICHFLOW, "run", str(path), "--base-url", server.base_url], prefect_api)
    try:
        eventually(lambda: ledger_tokens(prefect_api, name)[0] > 0, 120, 0.5)
        tokens, limit = ledger_tokens(prefect_api, name)
        assert limit == 100_000, "the job's budget sets the ledger's limit"
        status = start_job([ENRICHFLOW, "status"], prefect_api, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        said = status.communicate(timeout=120)[0]
        assert f"local 127.0.0.1:{server.port} gpt-4o-mini: {int(tokens * 0.9):,} prompt " \
               "tokens in unfinished batches, of a limit of 100,000" in said, said
        assert "at batch prices" in said
        row = committed_artifact(prefect_api, name)
        assert row["prompt tokens in unfinished batches"] == f"{int(tokens * 0.9):,}", row
        cancel = start_job([ENRICHFLOW, "cancel", str(tmp_path / "out")], prefect_api,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert cancel.wait(120) == 0, cancel.stdout.read()
        assert ledger_tokens(prefect_api, name)[0] == 0, f"{tokens} tokens given back at the cancel"
        run.wait(120)
        row = committed_artifact(prefect_api, name)
        assert row["prompt tokens in unfinished batches"] == "0", "the artifact follows"
    finally:
        run.kill()


def committed_artifact(prefect_api: str, name: str) -> dict[str, str]:
    """The ledger `name`'s row in the latest version of the organisation's artifact."""
    found = httpx.post(f"{prefect_api}/artifacts/filter", timeout=60, json={
        "artifacts": {"key": {"any_": ["enrichflow-enqueued-tokens"]}},
        "sort": "CREATED_DESC", "limit": 1}).json()
    rows = json.loads(found[0]["data"])
    return next(row for row in rows if f"enqueued-tokens {row['ledger']}" == name)

