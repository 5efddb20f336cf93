"""Azure OpenAI's v1 API: localbatch's Azure face through the `openai` SDK, unchanged, as
Azure's docs use it, and the movies and furniture jobs on it through the CLI."""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pandas as pd
import pytest
from conftest import (
    ENRICHFLOW,
    chat_line,
    generated_movies,
    job_file,
    read_jsonl,
    sdk_client,
    start_job,
    wait_until,
)

import enrichflow
from localbatch import Simulation

KEY = "azure-test-key"


def azure_client(server, key: str = KEY) -> openai.OpenAI:
    """As Azure's v1 docs set the SDK up: the resource's /openai/v1/, the key also in
    Azure's own `api-key` header."""
    return sdk_client(server.azure_base_url, api_key=key, default_headers={"api-key": key})


def submit(client, lines: list[str]):
    file = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"job": "azure"})


def test_the_azure_face_speaks_files_batches_and_chat_with_azure_s_key_header(
        start_localbatch):
    server = start_localbatch(api_key=KEY)
    client = azure_client(server)
    batch = wait_until(client, submit(client, [chat_line("a", "hello"),
                                               chat_line("b", "there")]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 2
    assert {line["custom_id"] for line in read_jsonl(client, batch.output_file_id)} == \
        {"a", "b"}
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert client.chat.completions.create(model="gpt-4o-mini", messages=[
        {"role": "user", "content": "hi"}]).choices[0].message.content
    # Azure's header alone is enough; a wrong key in it is Azure's 401
    assert httpx.get(f"{server.azure_base_url}batches", headers={"api-key": KEY}
                     ).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        azure_client(server, "wrong").batches.list()


def test_an_azure_batch_takes_azure_s_file_limit_and_is_never_expired(start_localbatch):
    """OpenAI's face refuses a file over its request limit and expires a batch at the end
    of its window; Azure's takes twice the requests and lets a job run on."""
    server = start_localbatch(Simulation(max_requests_per_batch=4,
                                         azure_max_requests_per_batch=8,
                                         completion_window_seconds=1, requests_per_second=1))
    lines = [chat_line(f"r{i}", f"row {i}") for i in range(6)]
    at_openai = sdk_client(server.base_url)
    refused = wait_until(at_openai, submit(at_openai, lines).id)
    assert refused.status == "failed" and refused.errors.data[0].code == "too_many_tasks"
    expired = wait_until(at_openai, submit(at_openai, lines[:3]).id, timeout=60)
    assert expired.status == "expired"

    at_azure = azure_client(server)
    done = wait_until(at_azure, submit(at_azure, lines).id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 6


@pytest.mark.parametrize("config", ["movies", "furniture"])
def test_a_job_runs_on_azure_with_its_key_and_says_so(start_localbatch, prefect_api, tmp_path,
                                                      config):
    """`provider.kind: azure`, the deployment named as its model, the key in
    AZURE_OPENAI_API_KEY; the same columns and statuses as on OpenAI."""
    server = start_localbatch(api_key=KEY)
    path = job_file(tmp_path, config=config, canary=True, **{
        "provider.kind": "azure", "provider.base_url": server.azure_base_url,
        "dataset.limit": 30})
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env_extra={"AZURE_OPENAI_API_KEY": KEY})
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert f"answered by: Azure OpenAI at {server.azure_base_url}" in stdout
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 30 and (data["_status"] == "ok").all()
    canary = data["_batch_id"].str.startswith("canary-")
    assert canary.sum() == 15 and (~canary).sum() == 15  # the sample answered synchronously
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["provider"]["kind"] == "azure"


def test_canary_only_and_the_python_api_on_azure(start_localbatch, prefect_api, tmp_path,
                                               monkeypatch):
    server = start_localbatch(api_key=KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    path = job_file(tmp_path, canary=True, **{
        "provider.kind": "azure", "provider.base_url": server.azure_base_url,
        "canary.rows": 5})
    run = start_job([ENRICHFLOW, "run", str(path), "--canary-only"], prefect_api,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert "5 of 5 sample rows answered usably (sync" in stdout
    assert azure_client(server).batches.list().data == []

    movies = generated_movies(4)
    enriched = enrichflow.enrich(
        movies, user="Title: {Series_Title}", model="gpt-4o-mini", workdir=str(tmp_path / "w"),
        provider={"kind": "azure", "base_url": server.azure_base_url})
    assert enriched["Series_Title"].tolist() == movies["Series_Title"].tolist()
    assert set(enriched["_status"]) == {"ok"} and enriched["response"].notna().all()


def test_azure_without_its_key_is_one_line_before_anything_is_sent(prefect_api, tmp_path):
    path = job_file(tmp_path, **{"provider.kind": "azure",
                                 "provider.base_url": "http://127.0.0.1:9/openai/v1/"})
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, unset=("AZURE_OPENAI_API_KEY",),
                    stderr=subprocess.PIPE, text=True)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2
    assert stderr.strip() == (
        "error: provider.kind is azure but AZURE_OPENAI_API_KEY is not set; export it, or "
        "name a Prefect Secret block in provider.api_key_secret")
