"""The job flow end to end: real Prefect, a real local Batch API server over HTTP."""

from __future__ import annotations

import collections
import json
import signal
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml
from conftest import REPO, generated_movies, job_file, python_job, sdk_client, wait_for_batches

from enrichflow.cli import main
from enrichflow.errors import InputError, ProviderError, RowsFailedError
from enrichflow.flows import output as output_module
from enrichflow.flows.enrich import enrich
from localbatch import HttpFault, Simulation


def batches_by_shard(client) -> collections.Counter:
    tags = [(b.metadata["enrichflow_run"], b.metadata["attempt"], b.metadata["shard"])
            for b in client.batches.list(limit=100)]
    return collections.Counter(tags)


def test_movies_job_writes_every_row_with_typed_answers(prefect_api, start_localbatch,
                                                         tmp_path):
    server = start_localbatch()
    manifest = enrich(str(job_file(tmp_path)), base_url=server.base_url)

    output = tmp_path / "out"
    data = pd.read_parquet(output)
    source = pd.read_csv(REPO / "data" / "movies.csv")
    assert len(source) >= 200
    assert data["Series_Title"].tolist() == source["Series_Title"].tolist()
    assert (data["_status"] == "ok").all() and data["_error"].isna().all()
    table = ds.dataset(output).to_table()
    assert table.schema.field("categories").type == pa.list_(pa.string())
    assert table.schema.field("summary").type == pa.string()
    assert table.schema.field("IMDB_Rating").type == pa.float64()
    first = data.iloc[0]
    assert list(first["categories"]) == ["title", first["Series_Title"].split()[1].lower(),
                                         first["Series_Title"].split()[2].lower()]
    assert first["_attempts"] == 1 and first["_batch_id"].startswith("batch_")
    assert first["_prompt_tokens"] > 0 and first["_completion_tokens"] > 0

    assert manifest["rows"] == len(source) and manifest["rows_by_status"] == {"ok": len(source)}
    saved = json.loads((output / "_manifest.json").read_text())
    assert saved["job_key"] == manifest["job_key"] and saved["shards"][0]["file_id"]
    assert saved["tokens"]["prompt"] == int(data["_prompt_tokens"].sum())

    client = sdk_client(server.base_url)
    batches = len(client.batches.list().data)
    written = (output / "part-00000.parquet").stat().st_mtime_ns
    assert enrich(str(job_file(tmp_path)), base_url=server.base_url)["run_id"] == \
        manifest["run_id"]
    assert len(client.batches.list().data) == batches, "a completed job must not send again"
    assert (output / "part-00000.parquet").stat().st_mtime_ns == written


def test_faults_shards_and_retries_still_give_every_row_once(prefect_api, start_localbatch,
                                                             tmp_path):
    sim = Simulation(
        seed=7, request_failure_rate=0.1, expire_batches=1, expire_after_requests=60,
        http_faults=[
            HttpFault(path="/v1/batches", method="POST", status=429, rate=0.3, retry_after=0),
            HttpFault(path="/v1/batches", method="GET", status=500, rate=0.2),
            HttpFault(path="/v1/files", status=500, rate=0.2),
        ])
    server = start_localbatch(sim)
    rows = generated_movies(1000)
    path = job_file(tmp_path, rows, **{"dataset.id_column": "Series_Title",
                                       "limits.max_requests_per_shard": 250,
                                       "limits.max_attempts": 6})
    manifest = enrich(str(path), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out")
    assert sorted(data["Series_Title"]) == sorted(rows["Series_Title"])
    assert (data["_status"] == "ok").all(), data[data["_status"] != "ok"]["_error"].tolist()
    assert data["_attempts"].max() > 1, "failed and expired requests should have gone again"
    assert data["_custom_id"].is_unique
    assert data["Overview"].tolist() == rows["Overview"].tolist()
    first_attempt = [s for s in manifest["shards"] if s["attempt"] == 1]
    assert len(first_attempt) == 4 and all(s["rows"] == 250 for s in first_attempt)
    assert any(s["batch_status"] == "expired" for s in manifest["shards"])
    created = batches_by_shard(sdk_client(server.base_url, max_retries=5))
    assert set(created.values()) == {1}, "no shard may have two batches"
    assert len(created) == len(manifest["shards"])


def test_unusable_answers_go_round_until_the_attempt_limit(prefect_api, start_localbatch,
                                                           tmp_path):
    server = start_localbatch()
    path = job_file(tmp_path, generated_movies(6), **{"limits.max_attempts": 2})
    job = yaml.safe_load(path.read_text())
    job["request"]["response_format"]["schema"]["properties"]["summary"]["pattern"] = "^[A-Z]+$"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(RowsFailedError, match=r"6 of 6 rows failed, more than "
                                              r"limits.max_failed_share \(50%\)"):
        enrich(str(path), base_url=server.base_url)
    data = pd.read_parquet(tmp_path / "out")  # written all the same
    assert (data["_status"] == "failed").all() and (data["_attempts"] == 2).all()
    assert data["_error"].str.contains("does not fit the schema at summary").all()
    assert data["summary"].isna().all()


def test_rows_with_an_empty_template_column_are_skipped(prefect_api, start_localbatch,
                                                        tmp_path):
    server = start_localbatch()
    rows = generated_movies(5)
    rows.loc[2, "Overview"] = ""
    enrich(str(job_file(tmp_path, rows)), base_url=server.base_url)
    data = pd.read_parquet(tmp_path / "out")
    assert data["_status"].tolist() == ["ok", "ok", "skipped", "ok", "ok"]
    assert data.loc[2, "_error"] == "skipped: column 'Overview' is empty"
    batch = sdk_client(server.base_url).batches.list().data[0]
    assert batch.request_counts.total == 4


@pytest.mark.parametrize(("change", "expected"), [
    ({"request.user": "{Series_Title}: {Plot}"}, "uses column\\(s\\) Plot that"),
    ({"dataset.path": "/nonexistent/movies.csv"}, "does not exist"),
    ({"dataset.id_column": "Genre"}, "appear more than once"),
])
def test_bad_input_fails_before_anything_is_uploaded(prefect_api, start_localbatch, tmp_path,
                                                     change, expected):
    server = start_localbatch()
    with pytest.raises(InputError, match=expected):
        enrich(str(job_file(tmp_path, **change)), base_url=server.base_url)
    client = sdk_client(server.base_url)
    assert client.files.list().data == [] and client.batches.list().data == []
    assert not (tmp_path / "out").exists()


def test_no_more_shards_than_max_shards_in_flight_run_at_once(prefect_api, start_localbatch,
                                                              tmp_path):
    """Against a server with no token limit too: the first shards are collected while
    the later ones wait to be sent, every row is written once, and the files at the
    provider are those of the shards in flight (an input and an output each), removed as
    their shards are collected: bounded by the cap, not by the count of shards."""
    server = start_localbatch(Simulation(requests_per_second=20, chunk_size=2))
    path = job_file(tmp_path, generated_movies(60), **{"limits.max_requests_per_shard": 10,
                                                      "limits.max_shards_in_flight": 2})
    most, most_files, done = [0], [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            most[0] = max(most[0], len(server.store.active_batch_ids()))
            most_files[0] = max(most_files[0], len(list(server.store.files_dir.iterdir())))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        enrich(str(path), base_url=server.base_url)
    finally:
        done.set()
        sampler.join()
    assert most[0] == 2
    assert 2 <= most_files[0] <= 2 * 2, most_files[0]  # 6 shards: 12 files if kept
    assert len(sdk_client(server.base_url).batches.list().data) == 6
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 60 and data["Series_Title"].is_unique
    assert (data["_status"] == "ok").all()


def test_a_killed_run_resumes_without_creating_batches_again(prefect_api, start_localbatch,
                                                             tmp_path, capsys):
    server = start_localbatch(Simulation(requests_per_second=15, chunk_size=5))
    rows = generated_movies(90)
    path = job_file(tmp_path, rows, **{"limits.max_requests_per_shard": 30})
    run = python_job(path, server.base_url, prefect_api)
    journal = tmp_path / "out" / "_state" / "run.json"
    state = wait_for_batches(run, lambda: journal.exists() and json.loads(journal.read_text()),
                             shards=3)
    run.send_signal(signal.SIGKILL)
    run.wait()
    client = sdk_client(server.base_url)
    created = len(client.batches.list().data)
    assert created == 3
    assert main(["status", str(tmp_path / "out")]) == 0
    assert (f"enrichflow run {path} --output {tmp_path / 'out'} --base-url {server.base_url}"
            in capsys.readouterr().out), "status says how to resume, base URL included"

    manifest = enrich(str(path), base_url=server.base_url)
    assert len(client.batches.list().data) == created
    data = pd.read_parquet(tmp_path / "out")
    assert sorted(data["Series_Title"]) == sorted(rows["Series_Title"])
    assert (data["_status"] == "ok").all()
    assert {s["batch_id"] for s in manifest["shards"]} == {s["batch_id"] for s in
                                                           state["shards"]}


def test_an_upload_never_journaled_is_deleted_before_the_shard_goes_up_again(
        prefect_api, start_localbatch, tmp_path):
    """The state a kill right after an upload leaves: the file is at the provider, the
    journal still says `uploading`. The re-run deletes that orphan, uploads once more."""
    server = start_localbatch(Simulation(http_faults=[
        HttpFault(path="/v1/batches", method="POST", status=400, rate=1.0, times=1)]))
    path = job_file(tmp_path, generated_movies(5))
    with pytest.raises(ProviderError, match="POST .*/v1/batches failed: HTTP 400"):
        enrich(str(path), base_url=server.base_url)
    journal_path = tmp_path / "out" / "_state" / "run.json"
    journal = json.loads(journal_path.read_text())
    (shard,) = journal["shards"]
    orphan = shard["file_id"]
    shard.update(status="uploading", file_id=None)
    journal_path.write_text(json.dumps(journal))

    enrich(str(path), base_url=server.base_url)
    client = sdk_client(server.base_url)
    uploads = [f.id for f in client.files.list(purpose="batch")]
    assert orphan not in uploads and uploads == [], "the shard's own upload goes once collected"
    assert pd.read_parquet(tmp_path / "out")["_status"].eq("ok").all()


def test_a_folder_of_parquet_files_becomes_parts_in_input_order(prefect_api, start_localbatch,
                                                                tmp_path, monkeypatch):
    """A hive-partitioned folder, several shards and output parts, failed requests that go
    round again: every input row once, in input order, across parts; results journaled
    per shard are dropped once the output is written, and so are the provider's files."""
    monkeypatch.setattr(output_module, "PART_ROWS", 40)
    movies = generated_movies(150)
    for year, rows in ((2001, movies.iloc[:70]), (2002, movies.iloc[70:])):
        (tmp_path / "rows" / f"year={year}").mkdir(parents=True)
        rows.to_parquet(tmp_path / "rows" / f"year={year}" / "part.parquet")
    server = start_localbatch(Simulation(request_failure_rate=0.2, seed=3))
    path = job_file(tmp_path, **{"dataset.path": str(tmp_path / "rows"), "dataset.format": None,
                                 "dataset.id_column": "Series_Title",
                                 "limits.max_requests_per_shard": 30})
    manifest = enrich(str(path), base_url=server.base_url)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(4)]
    data = pd.read_parquet(out)
    assert data["Series_Title"].tolist() == movies["Series_Title"].tolist()
    assert data["year"].astype(str).tolist() == ["2001"] * 70 + ["2002"] * 80
    assert (data["_status"] == "ok").all() and (data["_attempts"] > 1).any()
    assert manifest["rows"] == 150 and manifest["parts"] == 4 and manifest["attempts"] > 1
    assert not (out / "_state" / "results").exists()
    assert sdk_client(server.base_url).files.list().data == []
