"""Datasets, outputs and run state on S3: a real S3 endpoint on loopback (moto server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pandas as pd
import pytest
from conftest import (
    ENRICHFLOW,
    generated_movies,
    job_file,
    python_job,
    read_all,
    sdk_client,
    start_job,
    wait_for_batches,
)

from enrichflow.config import DatasetConfig, load_job
from enrichflow.errors import ConfigError, InputError, StorageError
from enrichflow.flows.enrich import enrich
from enrichflow.tasks.load import Source
from localbatch import Simulation


@pytest.fixture
def bucket(s3) -> str:
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    s3.mkdir(name)
    return name


def s3_job(tmp_path, s3_endpoint, s3, bucket, rows: pd.DataFrame, **changes):
    s3.pipe(f"{bucket}/input/movies.csv", rows.to_csv(index=False).encode())
    return job_file(tmp_path, **{"dataset.path": f"s3://{bucket}/input/movies.csv",
                                 "output": f"s3://{bucket}/enriched/movies",
                                 "storage_options": {"endpoint_url": s3_endpoint}, **changes})


def test_a_job_reads_and_writes_s3(prefect_api, start_localbatch, s3_endpoint, s3, bucket,
                                   tmp_path):
    server = start_localbatch()
    rows = generated_movies(40)
    enrich(str(s3_job(tmp_path, s3_endpoint, s3, bucket, rows)), base_url=server.base_url)

    options = {"endpoint_url": s3_endpoint}
    data = pd.read_parquet(f"s3://{bucket}/enriched/movies", storage_options=options)
    assert data["Series_Title"].tolist() == rows["Series_Title"].tolist()
    assert (data["_status"] == "ok").all()
    manifest = json.loads(s3.cat(f"{bucket}/enriched/movies/_manifest.json"))
    assert manifest["rows"] == 40 and manifest["output"] == f"s3://{bucket}/enriched/movies"
    assert s3.exists(f"{bucket}/enriched/movies/_state/run.json")
    assert s3.find(f"{bucket}/enriched/movies/_staging") == [], "staged files are moved"
    written = [s3.cat(p).decode() for p in s3.find(f"{bucket}/enriched") if p.endswith(".json")]
    assert not any(os.environ["AWS_SECRET_ACCESS_KEY"] in text for text in written)


def test_a_killed_run_resumes_from_state_on_s3(prefect_api, start_localbatch, s3_endpoint, s3,
                                               bucket, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=15, chunk_size=5))
    rows = generated_movies(60)
    path = s3_job(tmp_path, s3_endpoint, s3, bucket, rows,
                  **{"limits.max_requests_per_shard": 30})
    run = python_job(path, server.base_url, prefect_api)
    journal = f"{bucket}/enriched/movies/_state/run.json"
    wait_for_batches(run, lambda: s3.exists(journal) and json.loads(s3.cat(journal)), shards=2)
    run.send_signal(signal.SIGKILL)
    run.wait()

    client = sdk_client(server.base_url)
    assert len(client.batches.list().data) == 2
    enrich(str(path), base_url=server.base_url)
    assert len(client.batches.list().data) == 2
    data = pd.read_parquet(f"s3://{bucket}/enriched/movies",
                           storage_options={"endpoint_url": s3_endpoint})
    assert sorted(data["Series_Title"]) == sorted(rows["Series_Title"])
    assert (data["_status"] == "ok").all()


def test_a_missing_bucket_fails_before_any_batch(prefect_api, start_localbatch, s3_endpoint, s3,
                                                 bucket, tmp_path):
    server = start_localbatch()
    path = s3_job(tmp_path, s3_endpoint, s3, bucket, generated_movies(3),
                  output="s3://no-such-bucket-here/out")
    with pytest.raises(StorageError) as info:
        enrich(str(path), base_url=server.base_url)
    assert "s3://no-such-bucket-here/out" in str(info.value)
    assert "check that the bucket exists, your credentials" in str(info.value)
    client = sdk_client(server.base_url)
    assert client.batches.list().data == [] and client.files.list().data == []
    assert not s3.exists("no-such-bucket-here")


@pytest.mark.parametrize(("endpoint", "unset", "cause"), [
    ("http://127.0.0.1:9", (), "EndpointConnectionError: Could not connect to the endpoint"),
    (None, ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
     "NoCredentialsError: Unable to locate credentials"),
])
def test_storage_errors_are_one_line_and_exit_2(prefect_api, s3_endpoint, tmp_path, endpoint,
                                                unset, cause):
    """A wrong endpoint or no credentials: one `error:` line, not pages of tracebacks."""
    path = job_file(tmp_path, output="s3://some-bucket/movies",
                    storage_options={"endpoint_url": endpoint or s3_endpoint})
    run = start_job([ENRICHFLOW, "run", str(path), "--limit", "3"], prefect_api,
                    unset=(*unset, "AWS_PROFILE"), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 2
    assert "Traceback" not in stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read s3://some-bucket/movies/") and cause in last
    assert last.endswith("check that the bucket exists, your credentials, and, for "
                         "S3-compatible storage, the endpoint: storage_options.endpoint_url "
                         "in the job file, or AWS_ENDPOINT_URL in the environment (what "
                         "`enrichflow status` and `cancel` read)")


def test_credentials_in_storage_options_are_refused(tmp_path):
    path = job_file(tmp_path, storage_options={"key": "AKIA...", "client_kwargs": {
        "aws_secret_access_key": "x"}})
    with pytest.raises(ConfigError, match="key, aws_secret_access_key: credentials do not "
                                          "belong in a job file"):
        load_job(path)


@pytest.mark.parametrize("pattern", ["rows", "rows/*/*.csv"])
def test_a_dataset_folder_or_glob_on_s3_is_read_in_path_order(s3_endpoint, s3, bucket,
                                                              pattern):
    for year in (2002, 2001):
        s3.pipe(f"{bucket}/rows/year={year}/part.csv", f"text\n{year}a\n{year}b\n".encode())
    s3.pipe(f"{bucket}/rows/_SUCCESS", b"")
    source = Source.open(DatasetConfig(path=f"s3://{bucket}/{pattern}"),
                         {"endpoint_url": s3_endpoint})
    rows = read_all(source)
    assert rows["text"].to_pylist() == ["2001a", "2001b", "2002a", "2002b"]
    assert rows["year"].to_pylist() == ["2001", "2001", "2002", "2002"]


def test_a_missing_dataset_on_s3_gets_a_close_name_and_an_s3_hint(s3_endpoint, s3, bucket):
    s3.pipe(f"{bucket}/input/movies.csv", b"text\na\n")
    with pytest.raises(InputError) as info:
        Source.open(DatasetConfig(path=f"s3://{bucket}/input/movie.csv"),
                    {"endpoint_url": s3_endpoint})
    assert str(info.value) == (
        f"dataset.path: s3://{bucket}/input/movie.csv does not exist (did you mean "
        f"s3://{bucket}/input/movies.csv?); check the bucket and key, and that the "
        "credentials and storage_options.endpoint_url (or AWS_ENDPOINT_URL) are those of "
        "the store that holds it")
