"""The canary: a sample answered and checked before any batch, through real Prefect and
the local server over HTTP."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import REPO, generated_movies, job_file, python_job, sdk_client, start_job, wait_until

from enrichflow.cli import main
from enrichflow.errors import CanaryFailedError
from enrichflow.flows.enrich import enrich
from enrichflow.storage import Location
from enrichflow.tasks.state import RunState, ShardRecord
from localbatch import HttpFault, Simulation

# The mock answers the summary with words of the request: never one that fits this.
UNFILLABLE = {"request.response_format.schema.properties.summary.pattern": "^[0-9]{3}$"}


def requests_in_batches(client) -> int:
    return sum(b.request_counts.total for b in client.batches.list(limit=100))


def test_a_schema_the_model_cannot_fill_stops_the_job_with_nothing_uploaded(
        prefect_api, start_localbatch, tmp_path, capsys):
    server = start_localbatch()
    path = job_file(tmp_path, canary=True, **UNFILLABLE)
    with pytest.raises(CanaryFailedError) as info:
        enrich(str(path), base_url=server.base_url)
    message = str(info.value)
    assert "0 of 20 sample rows answered usably" in message
    assert "stopped before uploading its batches" in message
    assert "does not match '^[0-9]{3}$'" in message and "--canary-only" in message
    client = sdk_client(server.base_url)
    assert client.files.list().data == [] and client.batches.list().data == []
    assert not (tmp_path / "out" / "_manifest.json").exists()

    artifact = httpx.post(f"{prefect_api}/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["movies-canary"]}}, "sort": "CREATED_DESC",
        "limit": 1}).json()[0]
    assert "FAILED" in artifact["data"] and "The Burning Lantern" in artifact["data"]

    assert main(["run", str(path), "--base-url", server.base_url]) == 2
    assert "error: canary (sync): 0 of 20" in capsys.readouterr().err
    assert client.files.list().data == []


def test_a_passing_canary_is_not_paid_twice(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    manifest = enrich(str(job_file(tmp_path, canary=True)), base_url=server.base_url)
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all() and manifest["rows"] == len(data)
    assert requests_in_batches(sdk_client(server.base_url)) == len(data) - 20
    canary = data.iloc[:20]
    assert (canary["_batch_id"] == f"canary-{manifest['run_id']}").all()
    assert (canary["_attempts"] == 1).all()
    assert not canary["_reused"].any()
    # paid at synchronous prices (twice the batch price), the rest at batch prices
    per_token = data["_cost_usd"] / (data["_prompt_tokens"] + 4 * data["_completion_tokens"])
    assert per_token.iloc[:20].min() == pytest.approx(2 * per_token.iloc[20:].max())


def test_a_request_that_passed_its_canary_is_not_checked_again_on_new_rows(
        prefect_api, start_localbatch, tmp_path):
    """A daily delta: the table grows by 10 rows; the same request passed yesterday, so
    they go in the batch at batch prices, not half of them synchronously. A changed
    prompt is checked again, and so is every run with `canary.again: always`."""
    server = start_localbatch()
    client = sdk_client(server.base_url)
    path = job_file(tmp_path, generated_movies(40), canary=True)
    enrich(str(path), base_url=server.base_url)
    assert requests_in_batches(client) == 20  # 20 in the canary

    job_file(tmp_path, generated_movies(50), canary=True)  # 10 new rows, same request
    run = start_job([sys.executable, "-m", "enrichflow", "run", str(path), "--base-url",
                     server.base_url], prefect_api, stderr=subprocess.PIPE, text=True)
    _, log = run.communicate(timeout=300)
    assert run.returncode == 0, log[-2000:]
    assert requests_in_batches(client) == 20 + 10
    assert "canary: this request (prompt, schema, model, parameters) passed a canary on " \
        in log and "(20 of 20 rows usable)" in log
    data = pd.read_parquet(tmp_path / "out")
    assert not data["_batch_id"].iloc[40:].str.startswith("canary").any()

    for changes in ({"request.system": "A changed prompt."}, {"canary.again": "always"}):
        path = job_file(tmp_path, generated_movies(60), canary=True, **changes)
        sent = requests_in_batches(client)
        manifest = enrich(str(path), base_url=server.base_url)
        expected_sync = 20 if "request.system" in changes else 5  # half of 10 new rows
        assert requests_in_batches(client) - sent == manifest["rows"] - manifest[
            "rows_reused"] - expected_sync, changes


def test_canary_only_checks_and_keeps_the_sample_for_the_full_run(prefect_api, start_localbatch,
                                                                  tmp_path, capsys):
    server = start_localbatch()
    path = job_file(tmp_path, canary=True, **{"canary.mode": "batch", "canary.rows": 5})
    client = sdk_client(server.base_url)
    assert main(["run", str(path), "--base-url", server.base_url, "--canary-only"]) == 0
    printed = capsys.readouterr().out
    assert "5 of 5 sample rows answered usably (batch" in printed
    # its answers, a row a line, and where they are kept
    header, *rows = printed.split("usably", 1)[1].splitlines()[1:7]
    assert header.split() == ["row", "categories", "summary", "_error"]
    titles = pd.read_csv(REPO / "data" / "movies.csv")["Series_Title"].head(5)
    assert all(row.strip().startswith(title) for row, title in zip(rows, titles, strict=True))
    assert f"(kept in {tmp_path / 'out'}/_state/results/canary.parquet" in printed
    (batch,) = client.batches.list().data
    assert batch.request_counts.total == 5 and batch.metadata["enrichflow_canary"]
    assert not (tmp_path / "out" / "_manifest.json").exists()
    # the estimate now has a likely cost: the canary measured the answers' length
    assert main(["estimate", str(path)]) == 0
    mean_output = pd.read_parquet(tmp_path / "out" / "_state" / "results" / "canary.parquet"
                                  )["_completion_tokens"].mean()
    estimate = capsys.readouterr().out
    assert re.search(rf"likely cost at batch prices: +\$[0-9.]+ \(output of "
                     rf"{mean_output:,.0f} tokens a request, as the canary's 5 answers "
                     rf"averaged\)", estimate)
    assert re.search(r"already sent by the run this one resumes: +5\n", estimate)
    assert re.search(r"requests to send: +235\n", estimate)  # 240 rows, less the sample

    manifest = enrich(str(path), base_url=server.base_url)
    assert requests_in_batches(client) == manifest["rows"]  # the sample was not sent again
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_batch_id"].iloc[:5] == batch.id).all() and (data["_status"] == "ok").all()


def run_to_its_canary_batch(server, tmp_path, prefect_api) -> tuple[Path, subprocess.Popen]:
    """A job on 10 rows with a 5-row canary batch, in its own process, once that batch
    is created; (its job file, its process)."""
    path = job_file(tmp_path, generated_movies(10), canary=True,
                    **{"canary.mode": "batch", "canary.rows": 5})
    client = sdk_client(server.base_url)
    run = python_job(path, server.base_url, prefect_api)
    deadline = time.monotonic() + 120
    while not client.batches.list().data:
        assert run.poll() is None and time.monotonic() < deadline, "no canary batch"
        time.sleep(0.1)
    return path, run


def killed_at_its_canary_batch(server, tmp_path, prefect_api) -> Path:
    """The job of `run_to_its_canary_batch`, SIGKILLed once its canary batch is created;
    its job file."""
    path, run = run_to_its_canary_batch(server, tmp_path, prefect_api)
    run.send_signal(signal.SIGKILL)
    run.wait()
    return path


def test_a_run_killed_while_its_canary_batch_waits_does_not_pay_for_another(
        prefect_api, start_localbatch, tmp_path, capsys):
    server = start_localbatch(Simulation(validating_seconds=5))
    client = sdk_client(server.base_url)
    path = killed_at_its_canary_batch(server, tmp_path, prefect_api)
    (canary,) = client.batches.list().data
    assert canary.status == "validating"
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "no batch journaled yet: it was preparing, or checking its canary" in \
        capsys.readouterr().out

    enrich(str(path), base_url=server.base_url)
    batches = client.batches.list().data
    assert [b.id for b in batches if "enrichflow_canary" in b.metadata] == [canary.id]
    assert sum(b.request_counts.total for b in batches) == 10
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_batch_id"].iloc[:5] == canary.id).all() and (data["_status"] == "ok").all()


def test_a_cancel_while_the_canary_batch_waits_cancels_it_and_sends_nothing_more(
        prefect_api, start_localbatch, tmp_path, capsys):
    server = start_localbatch(Simulation(validating_seconds=600))
    _, run = run_to_its_canary_batch(server, tmp_path, prefect_api)
    assert main(["cancel", str(tmp_path / "out")]) == 0
    assert "(the canary)" in capsys.readouterr().out
    assert run.wait(timeout=120) == 3  # cancelled, its output written

    (canary,) = sdk_client(server.base_url).batches.list().data
    assert canary.status == "cancelled"
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["cancelled"]
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 10 and (data["_status"] == "failed").all()
    assert (data["_error"].iloc[:5] == f"batch {canary.id} returned no result for this row").all()
    assert (data["_error"].iloc[5:] == "cancelled before it was sent").all()


def journaled_shards(tmp_path: Path) -> list[ShardRecord]:
    """The shards of the run's journal, as a resumed run reads them."""
    state = RunState.load(Location(str(tmp_path / "out")))
    return state.shards if state else []


def test_a_canary_batch_is_journaled_before_its_files_are_deleted(
        prefect_api, start_localbatch, tmp_path):
    """Its files' deletion held 20 s by a 503 + Retry-After: the canary is journaled by
    then, its files still at the server. Killed there, the next run completes with that
    one canary batch (no second one, no download of a deleted file)."""
    held = HttpFault(path="/v1/files/", method="DELETE", status=503, retry_after=20,
                     rate=1.0, times=1)
    server = start_localbatch(Simulation(http_faults=[held]))
    client = sdk_client(server.base_url)
    path, run = run_to_its_canary_batch(server, tmp_path, prefect_api)
    deadline = time.monotonic() + 120
    while not any(s.canary for s in journaled_shards(tmp_path)):
        assert run.poll() is None and time.monotonic() < deadline, "canary never journaled"
        time.sleep(0.1)
    (canary,) = client.batches.list().data
    files = {f.id for f in client.files.list().data}
    assert {canary.input_file_id, canary.output_file_id} <= files, "deleted before journaled"
    run.send_signal(signal.SIGKILL)
    run.wait()

    enrich(str(path), base_url=server.base_url)
    batches = client.batches.list().data
    assert [b.id for b in batches if "enrichflow_canary" in b.metadata] == [canary.id]
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_batch_id"].iloc[:5] == canary.id).all() and (data["_status"] == "ok").all()


def test_a_canary_batch_whose_answers_are_gone_is_replaced_not_a_dead_end(
        prefect_api, start_localbatch, tmp_path):
    """An older enrichflow deleted a canary batch's files before journaling it; killed in
    between, its runs found the batch and failed on the download (HTTP 404) for good."""
    server = start_localbatch(Simulation(validating_seconds=2))
    client = sdk_client(server.base_url)
    path = killed_at_its_canary_batch(server, tmp_path, prefect_api)
    (gone,) = client.batches.list().data
    gone = wait_until(client, gone.id)
    client.files.delete(gone.output_file_id)

    enrich(str(path), base_url=server.base_url)
    canaries = [b.id for b in client.batches.list().data if "enrichflow_canary" in b.metadata]
    assert len(canaries) == 2 and gone.id in canaries
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all() and gone.id not in set(data["_batch_id"])


def test_a_killed_runs_own_canary_answers_are_not_counted_as_reused(
        prefect_api, start_localbatch, tmp_path):
    """A run killed after it kept its answers in the cache, before its output was
    complete (the files as that kill leaves them: the journal unfinished, no manifest):
    run again, the canary's answers are this run's, not reused from an earlier one."""
    server = start_localbatch()
    path = job_file(tmp_path, generated_movies(40), canary=True, cleanup=False)
    first = enrich(str(path), base_url=server.base_url)
    assert first["rows_reused"] == 0
    out = tmp_path / "out"
    (out / "_manifest.json").unlink()
    journal = json.loads((out / "_state" / "run.json").read_text())
    (out / "_state" / "run.json").write_text(json.dumps({**journal, "finished_at": None}))

    again = enrich(str(path), base_url=server.base_url)
    assert again["run_id"] == first["run_id"] and again["rows_reused"] == 0
    data = pd.read_parquet(out)
    assert not data["_reused"].any() and (data["_status"] == "ok").all()
    assert (data["_batch_id"].iloc[:20] == f"canary-{first['run_id']}").all()
