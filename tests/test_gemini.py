"""Jobs on Gemini's Batch Mode (`provider.kind: gemini`) as a user runs them, against
localbatch's Gemini face with Google's `google-genai` SDK as its client: the same job
files, columns and statuses as on OpenAI; a run killed between its create call and its
journal write finds its batch again by its display name; a job that sits pending is
shown so and bounded by `limits.max_wait_hours`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ENRICHFLOW, generated_movies, job_file, start_job, wait_for_batches
from google import genai
from google.genai import errors, types
from pydantic import BaseModel

import enrichflow
from localbatch import HttpFault, Simulation

KEY = "gemini-test-key"
MODEL = "gemini-2.5-flash"
CREATE = "/gemini/v1/models"  # POST .../models/MODEL:batchGenerateContent


def on_gemini(server, tmp_path: Path, rows: pd.DataFrame | None = None, **changes) -> Path:
    return job_file(tmp_path, rows, **{"provider.kind": "gemini", "request.model": MODEL,
                                       "provider.base_url": server.gemini_base_url, **changes})


def run_cli(path: Path, prefect_api: str, *args: str) -> tuple[int, str, str]:
    run = start_job([ENRICHFLOW, "run", str(path), *args], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env_extra={"GEMINI_API_KEY": KEY})
    stdout, stderr = run.communicate(timeout=300)
    return run.returncode, stdout, stderr


def gemini(server, key: str = KEY) -> genai.Client:
    """A client of the face; keep it referenced while it is used (the SDK closes its
    connection pool when the client is collected)."""
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=server.gemini_base_url))


def batch_jobs(server) -> list[types.BatchJob]:
    client = gemini(server)
    return list(client.batches.list())


def journal(tmp_path: Path) -> dict:
    path = tmp_path / "out" / "_state" / "run.json"
    return path.exists() and json.loads(path.read_text())


class Movie(BaseModel):
    categories: list[str]
    summary: str


def test_the_gemini_face_speaks_files_batches_and_content_to_google_s_sdk(start_localbatch):
    """Resumable upload, batch create/get/list/cancel/delete, the result file's download,
    generateContent, and Google's errors, through the SDK as it is."""
    server = start_localbatch(Simulation(request_failure_rate=0.5, seed=3), api_key=KEY)
    client = gemini(server)
    lines = [{"key": f"row {i}", "request": {
        "contents": [{"role": "user", "parts": [{"text": f"hello world {i}"}]}],
        "generation_config": {"response_mime_type": "application/json",
                              "response_json_schema": {"type": "object", "properties": {
                                  "word": {"type": "string"}}, "required": ["word"]}}}}
        for i in range(6)]
    uploaded = client.files.upload(
        file=io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode()),
        config={"display_name": "requests.jsonl", "mime_type": "jsonl"})
    assert uploaded.display_name == "requests.jsonl" and uploaded.size_bytes > 0
    job = client.batches.create(model=MODEL, src=uploaded.name,
                                config={"display_name": "my job"})
    assert job.name.startswith("batches/") and job.display_name == "my job"
    while not (job := client.batches.get(name=job.name)).done:
        time.sleep(0.1)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert [j.name for j in client.batches.list()] == [job.name]
    results = [json.loads(line) for line in
               client.files.download(file=job.dest.file_name).decode().splitlines()]
    assert sorted(r["key"] for r in results) == [f"row {i}" for i in range(6)]
    answered = [r for r in results if "response" in r]
    failed = [r for r in results if "error" in r]
    assert answered and failed, "the simulation fails half of the requests"
    text = answered[0]["response"]["candidates"][0]["content"]["parts"][0]["text"]
    assert set(json.loads(text)) == {"word"}
    assert failed[0]["error"]["status"] == "INTERNAL" and failed[0]["error"]["code"] == 500

    with pytest.raises(errors.ClientError) as ended:
        client.batches.cancel(name=job.name)
    assert ended.value.code == 400
    client.batches.delete(name=job.name)
    with pytest.raises(errors.ClientError) as gone:
        client.batches.get(name=job.name)
    assert gone.value.code == 404 and gone.value.status == "NOT_FOUND"

    answer = client.models.generate_content(model=MODEL, contents="say hello")
    assert answer.text.startswith("Mock answer") and answer.usage_metadata.total_token_count
    with pytest.raises(errors.ClientError) as unknown:
        client.models.get(model="gemini-2.5-flahs")
    assert unknown.value.code == 404
    stranger = gemini(server, key="wrong")
    with pytest.raises(errors.ClientError) as refused:
        stranger.batches.list()
    assert refused.value.code == 401 and refused.value.status == "UNAUTHENTICATED"


def test_a_held_job_is_pending_then_cancelled(start_localbatch):
    server = start_localbatch(Simulation(validating_seconds=600), api_key=KEY)
    client = gemini(server)
    uploaded = client.files.upload(file=io.BytesIO(json.dumps({"key": "a", "request": {
        "contents": [{"parts": [{"text": "hi"}]}]}}).encode()), config={"mime_type": "jsonl"})
    job = client.batches.create(model=MODEL, src=uploaded.name)
    assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_PENDING
    client.batches.cancel(name=job.name)
    while not (job := client.batches.get(name=job.name)).done:
        time.sleep(0.1)
    assert job.state == types.JobState.JOB_STATE_CANCELLED


def test_a_dataframe_is_enriched_on_gemini_from_python(prefect_api, start_localbatch,
                                                       tmp_path, monkeypatch):
    """The Python API's same call, `provider="gemini"`: a Pydantic schema answered
    through Gemini's JSON-schema response settings, typed into the same columns."""
    server = start_localbatch(api_key=KEY)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    movies = generated_movies(6)
    enriched = enrichflow.enrich(
        movies, user="Title: {Series_Title}\nOverview: {Overview}", model=MODEL, schema=Movie,
        provider={"kind": "gemini", "base_url": server.gemini_base_url},
        workdir=str(tmp_path))
    assert enriched["Series_Title"].tolist() == movies["Series_Title"].tolist()
    assert set(enriched["_status"]) == {"ok"}
    assert enriched["categories"].map(len).gt(0).all()
    assert enriched["summary"].str.len().gt(0).all()
    assert enriched["_batch_id"].str.startswith("batches/").all()


@pytest.mark.parametrize("config", ["movies", "furniture"])
def test_a_job_runs_on_gemini_with_the_same_columns_and_says_so(
        start_localbatch, prefect_api, tmp_path, config):
    """The canary's sample answered through generateContent, the rest in a batch job;
    the furniture photos go as inline data."""
    server = start_localbatch(api_key=KEY)
    path = job_file(tmp_path, config=config, canary=True, **{
        "provider.kind": "gemini", "provider.base_url": server.gemini_base_url,
        "request.model": MODEL, "dataset.limit": 30})
    code, stdout, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    assert f"answered by: Gemini at {server.gemini_base_url}" in stdout
    assert "approximated offline with OpenAI's o200k tokenizer: Google's" in stdout + stderr
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 30 and (data["_status"] == "ok").all()
    assert data["_batch_id"].str.startswith("canary-").sum() == 15
    assert data["_batch_id"].str.startswith("batches/").sum() == 15
    assert data["_cost_usd"].gt(0).all() and data["_prompt_tokens"].gt(0).all()
    answers = {"movies": ["categories", "summary"], "furniture": ["caption"]}[config]
    for column in answers:
        assert data[column].notna().all(), column
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["provider"]["kind"] == "gemini"
    assert batch_jobs(server) == [], "a collected batch is deleted (cleanup)"


def test_new_rows_alone_go_again_and_failed_and_expired_requests_go_round_on_gemini(
        start_localbatch, prefect_api, tmp_path):
    server = start_localbatch(Simulation(request_failure_rate=0.3, expire_batches=1,
                                         expire_after_requests=5, seed=4), api_key=KEY)
    path = on_gemini(server, tmp_path, generated_movies(30), cleanup=False,
                     **{"limits.max_attempts": 6})
    code, _, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    assert (pd.read_parquet(tmp_path / "out")["_status"] == "ok").all()
    states = {job.state for job in batch_jobs(server)}
    assert types.JobState.JOB_STATE_EXPIRED in states and len(batch_jobs(server)) > 1
    before = len(batch_jobs(server))

    path = on_gemini(server, tmp_path, generated_movies(40), cleanup=False,
                     **{"limits.max_attempts": 6})
    code, stdout, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    assert "30 answered before (reused)" in stdout + stderr
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 40 and (data["_status"] == "ok").all()
    assert len(batch_jobs(server)) > before


def test_a_run_killed_between_create_and_journal_finds_its_batch_and_pays_once(
        start_localbatch, prefect_api, tmp_path):
    """The create's answer is held back (then lost), so the kill lands after the batch
    exists and before the journal has its id; the next run finds it by its display name."""
    server = start_localbatch(Simulation(http_faults=[HttpFault(
        path=CREATE, method="POST", rate=1.0, times=1, lost_response=True,
        delay_seconds=60)]), api_key=KEY)
    path = on_gemini(server, tmp_path, generated_movies(40), cleanup=False,
                     **{"limits.max_requests_per_shard": 20})
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api,
                    env_extra={"GEMINI_API_KEY": KEY})
    deadline = time.monotonic() + 120
    while len(batch_jobs(server)) < 2:  # batches carry metadata: the creates go together
        assert run.poll() is None and time.monotonic() < deadline, "no batch was created"
        time.sleep(0.1)
    run.send_signal(signal.SIGKILL)
    run.wait()
    creating = [s for s in journal(tmp_path)["shards"] if s["status"] == "creating"]
    assert creating and all(s["batch_id"] is None for s in creating)
    created = [job.name for job in batch_jobs(server) if job.name not in
               {s["batch_id"] for s in journal(tmp_path)["shards"]}]
    assert len(created) == len(creating)

    code, stdout, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    for name in created:
        assert f"found batch {name} created before a crash" in stdout + stderr
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 40 and (data["_status"] == "ok").all()
    assert data["Series_Title"].is_unique
    assert len(batch_jobs(server)) == 2, "one batch a shard"
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert set(created) <= {s["batch_id"] for s in manifest["shards"]}


def test_a_pending_job_is_shown_so_and_given_up_at_max_wait_hours_then_collected(
        start_localbatch, prefect_api, tmp_path):
    """Gemini may hold a job pending for hours: the log and `status` say so; past
    `limits.max_wait_hours` the run ends saying that it runs on, and the next run
    collects it, sending nothing again."""
    server = start_localbatch(Simulation(validating_seconds=25), api_key=KEY)
    path = on_gemini(server, tmp_path, generated_movies(10),
                     **{"limits.max_wait_hours": 0.002})  # 7.2 s
    code, stdout, stderr = run_cli(path, prefect_api)
    assert code != 0
    (job,) = batch_jobs(server)
    assert f"batch {job.name} is pending (not started)" in stdout + stderr
    assert "still running after limits.max_wait_hours (0.002 h)" in stderr, stderr[-2000:]
    status = subprocess.run([ENRICHFLOW, "status", str(tmp_path / "out")], text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, "GEMINI_API_KEY": KEY})
    assert "pending (not started)" in status.stdout, status.stdout + status.stderr

    path = on_gemini(server, tmp_path, generated_movies(10))
    code, _, stderr = run_cli(path, prefect_api)
    assert code == 0, stderr[-3000:]
    assert (pd.read_parquet(tmp_path / "out")["_status"] == "ok").all()
    assert len(batch_jobs(server)) == 0, "the one batch, collected and deleted"
    assert server.store.list_batches(None, 100, "gbatch")[0] == []


def test_cancel_cancels_a_gemini_batch(start_localbatch, prefect_api, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=5, chunk_size=1), api_key=KEY)
    path = on_gemini(server, tmp_path, generated_movies(200),
                     **{"limits.max_requests_per_shard": 100})
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, env_extra={"GEMINI_API_KEY": KEY})
    wait_for_batches(run, lambda: journal(tmp_path), shards=2)
    cancel = subprocess.run([ENRICHFLOW, "cancel", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PREFECT_API_URL": prefect_api,
                                 "GEMINI_API_KEY": KEY})
    assert cancel.returncode == 0, cancel.stderr
    assert "2 batch(es) cancelled" in cancel.stdout
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 3, output[-2000:]
    data = pd.read_parquet(tmp_path / "out")
    failed = data[data["_status"] == "failed"]
    assert len(failed) > 0 and failed["_error"].str.startswith("batch_cancelled").all()
