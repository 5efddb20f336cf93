"""Jobs on Anthropic's Message Batches (`provider.kind: anthropic`) as a user runs them,
against localbatch's Anthropic face: the same job files, columns and statuses as on
OpenAI; a run killed between its create call and its journal write finds its batch
again, though a Message Batch carries no metadata."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import anthropic
import pandas as pd
import pytest
from conftest import ENRICHFLOW, generated_movies, job_file, start_job, wait_for_batches
from pydantic import BaseModel

import enrichflow
from localbatch import HttpFault, Simulation

KEY = "sk-ant-test"
MODEL = "claude-haiku-4-5"
CREATE = "/v1/messages/batches"


def on_anthropic(server, tmp_path: Path, rows: pd.DataFrame | None = None, **changes) -> Path:
    return job_file(tmp_path, rows, **{"provider.kind": "anthropic", "request.model": MODEL,
                                       "provider.base_url": server.anthropic_base_url,
                                       **changes})


def run_cli(path: Path, prefect_api: str, *args: str) -> tuple[int, str, str]:
    run = start_job([ENRICHFLOW, "run", str(path), *args], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env_extra={"ANTHROPIC_API_KEY": KEY})
    stdout, stderr = run.communicate(timeout=300)
    return run.returncode, stdout, stderr


def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.anthropic_base_url, api_key=KEY)


def message_batches(server) -> list:
    return list(claude(server).messages.batches.list(limit=100))


class Movie(BaseModel):
    categories: list[str]
    summary: str


def test_a_dataframe_is_enriched_on_anthropic_from_python(prefect_api, start_localbatch,
                                                          tmp_path, monkeypatch):
    """The Python API's same call, `provider="anthropic"`: a Pydantic schema answered
    through Anthropic's structured outputs, typed into the same columns."""
    server = start_localbatch(api_key=KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    movies = generated_movies(6)
    enriched = enrichflow.enrich(
        movies, user="Title: {Series_Title}\nOverview: {Overview}", model=MODEL, schema=Movie,
        provider={"kind": "anthropic", "base_url": server.anthropic_base_url},
        workdir=str(tmp_path))
    assert enriched["Series_Title"].tolist() == movies["Series_Title"].tolist()
    assert set(enriched["_status"]) == {"ok"}
    assert enriched["categories"].map(len).gt(0).all()
    assert enriched["summary"].str.len().gt(0).all()
    assert enriched["_batch_id"].str.startswith("msgbatch_").all()


@pytest.mark.parametrize("config", ["movies", "furniture"])
def test_a_job_runs_on_anthropic_with_the_same_columns_and_says_so(
        start_localbatch, prefect_api, tmp_path, config):
    """The sample answered through /v1/messages, the rest in a Message Batch; the
    movies' titles (spaces, punctuation) are custom ids Anthropic would refuse as they are."""
    server = start_localbatch(api_key=KEY)
    path = job_file(tmp_path, config=config, canary=True, **{
        "provider.kind": "anthropic", "provider.base_url": server.anthropic_base_url,
        "request.model": MODEL, "dataset.limit": 30})
    code, stdout, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    assert f"answered by: Anthropic at {server.anthropic_base_url}" in stdout
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 30 and (data["_status"] == "ok").all()
    assert data["_batch_id"].str.startswith("canary-").sum() == 15
    assert data["_batch_id"].str.startswith("msgbatch_").sum() == 15
    assert data["_cost_usd"].gt(0).all() and data["_prompt_tokens"].gt(0).all()
    answers = {"movies": ["categories", "summary"], "furniture": ["caption"]}[config]
    for column in answers:
        assert data[column].notna().all(), column
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["provider"]["kind"] == "anthropic"
    assert message_batches(server) == [], "a collected batch is deleted (cleanup)"


def test_canary_only_answers_the_sample_through_messages_and_sends_no_batch(
        start_localbatch, prefect_api, tmp_path):
    server = start_localbatch(api_key=KEY)
    path = job_file(tmp_path, canary=True, **{
        "provider.kind": "anthropic", "provider.base_url": server.anthropic_base_url,
        "request.model": MODEL, "canary.rows": 5})
    code, stdout, stderr = run_cli(path, prefect_api, "--canary-only")
    assert code == 0, stderr[-3000:]
    assert "5 of 5 sample rows answered usably (sync" in stdout
    assert message_batches(server) == []
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_new_rows_alone_are_sent_again_and_the_cost_cap_holds_on_anthropic(
        start_localbatch, prefect_api, tmp_path):
    """An incremental re-run sends only the rows it has no answer for; a cap below the
    estimate stops the run before anything is sent."""
    server = start_localbatch(api_key=KEY)
    path = on_anthropic(server, tmp_path, generated_movies(20))
    assert run_cli(path, prefect_api)[0] == 0
    path = on_anthropic(server, tmp_path, generated_movies(30), cleanup=False)
    code, _, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    (batch,) = message_batches(server)  # the first run's was deleted once collected
    assert batch.request_counts.succeeded == 10
    assert pd.read_parquet(tmp_path / "out")["_status"].eq("ok").sum() == 30

    (tmp_path / "capped").mkdir()
    capped = on_anthropic(server, tmp_path / "capped", generated_movies(30),
                          max_cost_usd=0.000001)
    code, _, stderr = run_cli(capped, prefect_api)
    assert code == 2 and "max_cost_usd" in stderr, stderr[-2000:]
    assert len(message_batches(server)) == 1, "nothing sent past the cap"


def test_failed_and_expired_requests_go_round_again_on_anthropic(
        start_localbatch, prefect_api, tmp_path):
    server = start_localbatch(Simulation(request_failure_rate=0.3, expire_batches=1,
                                         expire_after_requests=5, seed=4), api_key=KEY)
    path = on_anthropic(server, tmp_path, generated_movies(40), cleanup=False,
                        **{"limits.max_attempts": 6})
    code, _, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 40 and (data["_status"] == "ok").all()
    batches = message_batches(server)
    assert len(batches) > 1 and any(b.request_counts.expired for b in batches)
    assert any(b.request_counts.errored for b in batches)


def test_a_run_killed_between_create_and_journal_finds_its_batch_and_pays_once(
        start_localbatch, prefect_api, tmp_path):
    """The create's answer is held back (then lost), so the kill lands after the batch
    exists and before the journal has its id; another client's batch of the same size,
    created meanwhile, is told apart by the custom ids in its results."""
    server = start_localbatch(Simulation(http_faults=[HttpFault(
        path=CREATE, method="POST", rate=1.0, times=1, lost_response=True,
        delay_seconds=60)]), api_key=KEY)
    path = on_anthropic(server, tmp_path, generated_movies(40), cleanup=False,
                        **{"limits.max_requests_per_shard": 20})
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api,
                    env_extra={"ANTHROPIC_API_KEY": KEY})
    deadline = time.monotonic() + 120
    while not message_batches(server):
        assert run.poll() is None and time.monotonic() < deadline, "no batch was created"
        time.sleep(0.1)
    run.send_signal(signal.SIGKILL)
    run.wait()
    journal = json.loads((tmp_path / "out" / "_state" / "run.json").read_text())
    first = journal["shards"][0]
    assert first["status"] == "creating" and first["batch_id"] is None
    (created,) = message_batches(server)

    other = claude(server).messages.batches.create(requests=[
        {"custom_id": f"other-{i}", "params": {"model": MODEL, "max_tokens": 20, "messages": [
            {"role": "user", "content": "hi"}]}} for i in range(20)])
    while claude(server).messages.batches.retrieve(other.id).processing_status != "ended":
        time.sleep(0.1)

    code, stdout, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    assert f"found batch {created.id} created before a crash" in stdout + stderr
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 40 and (data["_status"] == "ok").all()
    assert data["Series_Title"].is_unique
    assert len(message_batches(server)) == 3, "ours two, the other client's one"
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert created.id in {s["batch_id"] for s in manifest["shards"]}
    assert other.id not in set(data["_batch_id"])


def test_another_clients_batch_taken_for_a_shard_is_left_alone_and_its_rows_go_again(
        start_localbatch, prefect_api, tmp_path):
    """What is not guaranteed, made safe: the create fails (HTTP 500, nothing created)
    while another client creates a batch of the same size; the run takes it for the
    shard's, finds none of its requests in it, leaves it alone (not deleted: not ours)
    and sends its rows again."""
    server = start_localbatch(Simulation(requests_per_second=1, http_faults=[HttpFault(
        path=CREATE, method="POST", rate=1.0, times=1, delay_seconds=5)]), api_key=KEY)
    path = on_anthropic(server, tmp_path, generated_movies(20))
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, env_extra={"ANTHROPIC_API_KEY": KEY})
    journal = tmp_path / "out" / "_state" / "run.json"
    deadline = time.monotonic() + 120
    while not (journal.exists() and '"creating"' in journal.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, "the run never created"
        time.sleep(0.05)
    other = claude(server).messages.batches.create(requests=[
        {"custom_id": f"other-{i}", "params": {"model": MODEL, "max_tokens": 20, "messages": [
            {"role": "user", "content": "hi"}]}} for i in range(20)])
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-3000:]
    assert f"batch {other.id} holds none of its requests" in output
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 20 and (data["_status"] == "ok").all()
    assert claude(server).messages.batches.retrieve(other.id).request_counts.succeeded == 20
    assert [b.id for b in message_batches(server)] == [other.id], "the run's own: deleted"


def test_ctrl_c_says_what_the_running_message_batches_may_cost(
        start_localbatch, prefect_api, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=0.2), api_key=KEY)
    path = on_anthropic(server, tmp_path, generated_movies(20))
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, stderr=subprocess.PIPE,
                    text=True, env_extra={"ANTHROPIC_API_KEY": KEY}, start_new_session=True)
    journal = tmp_path / "out" / "_state" / "run.json"
    wait_for_batches(run, lambda: journal.exists() and json.loads(journal.read_text()),
                     shards=1)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    (batch,) = message_batches(server)
    assert re.match(
        rf"interrupted: 1 batch\(es\) \({batch.id}\) run on at Anthropic at "
        rf"{re.escape(server.anthropic_base_url)} and are billed as they finish \(about "
        r"\$0\.\d+ of prompts, up to \$0\.\d+ with the longest answers\); `enrichflow run",
        line), line


def test_cancel_cancels_a_message_batch(start_localbatch, prefect_api, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=5, chunk_size=1), api_key=KEY)
    path = on_anthropic(server, tmp_path, generated_movies(200),
                        **{"limits.max_requests_per_shard": 100})
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, env_extra={"ANTHROPIC_API_KEY": KEY})
    journal = tmp_path / "out" / "_state" / "run.json"
    wait_for_batches(run, lambda: journal.exists() and json.loads(journal.read_text()),
                     shards=2)
    cancel = subprocess.run([ENRICHFLOW, "cancel", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PREFECT_API_URL": prefect_api,
                                 "ANTHROPIC_API_KEY": KEY})
    assert cancel.returncode == 0, cancel.stderr
    assert "2 batch(es) cancelled" in cancel.stdout
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 3, output[-2000:]
    data = pd.read_parquet(tmp_path / "out")
    failed = data[data["_status"] == "failed"]
    assert len(failed) > 0 and failed["_error"].str.startswith("batch_cancelled").all()

