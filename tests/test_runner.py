"""Shards on a Dask cluster (prefect-dask): a LocalCluster of 2 worker processes gives the
output the run's own threads give, on local disk and on S3; workers killed in the middle
of a shard are replaced and the run goes on, and a run killed with them resumes, without
a second batch for any shard."""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pyarrow as pa
import pytest
from conftest import (
    ENRICHFLOW,
    free_port,
    generated_movies,
    job_file,
    sdk_client,
    start_job,
    wait_for_batches,
)

from enrichflow.flows.enrich import enrich
from enrichflow.storage import Location
from enrichflow.tasks import prepare
from enrichflow.tasks.cache import CACHED, DEFAULT_FILE, HASH, AnswerCache
from localbatch import HttpFault, Simulation

DASK = str(Path(sys.executable).with_name("dask"))
ANSWER_COLUMNS = ["Series_Title", "Overview", "categories", "summary", "_status", "_error",
                  "_attempts", "_custom_id", "_prompt_tokens", "_completion_tokens"]


def parquet_folder(fs, root: str, rows: pd.DataFrame, files: int) -> None:
    """The rows as `files` Parquet files under `root`, in order of their names."""
    size = -(-len(rows) // files)
    fs.makedirs(root, exist_ok=True)
    for i in range(files):
        with fs.open(f"{root}/part-{i:02d}.parquet", "wb") as handle:
            rows.iloc[i * size:(i + 1) * size].to_parquet(handle, index=False)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_dask_workers_give_the_rows_and_answers_of_threads(
        prefect_api, start_localbatch, s3_endpoint, s3, tmp_path, monkeypatch, storage):
    import fsspec

    monkeypatch.setattr(prepare, "PIECE_ROWS", 40)  # 3 scan pieces of 2 files each
    rows = generated_movies(120)
    outputs = {}
    if storage == "s3":
        bucket = f"bucket-{uuid.uuid4().hex[:8]}"
        s3.mkdir(bucket)
        fs, root = s3, f"s3://{bucket}"
        options = {"storage_options": {"endpoint_url": s3_endpoint}}
    else:
        fs, root, options = fsspec.filesystem("file"), str(tmp_path), {}
    parquet_folder(fs, f"{root}/rows", rows, files=6)
    server = start_localbatch()
    for runner in ("threads", "dask"):
        (tmp_path / runner).mkdir()
        path = job_file(tmp_path / runner, **{
            "dataset.path": f"{root}/rows", "output": f"{root}/out-{runner}", **options,
            "limits.max_requests_per_shard": 50, "runner.workers": 2})
        manifest = enrich(str(path), base_url=server.base_url, runner=runner)
        assert len(manifest["shards"]) == 3
        outputs[runner] = pd.read_parquet(f"{root}/out-{runner}",
                                          storage_options=options.get("storage_options"))
    assert outputs["dask"]["Series_Title"].tolist() == rows["Series_Title"].tolist()
    pd.testing.assert_frame_equal(outputs["dask"][ANSWER_COLUMNS],
                                  outputs["threads"][ANSWER_COLUMNS])

    # the workers read the answer cache themselves: a forced re-run reuses every answer
    batches = len(sdk_client(server.base_url).batches.list(limit=100).data)
    again = enrich(str(path), base_url=server.base_url, runner="dask", force=True)
    assert again["rows_reused"] == len(rows) and again["shards"] == []
    assert len(sdk_client(server.base_url).batches.list(limit=100).data) == batches


def test_the_answer_cache_goes_to_a_task_by_name_not_with_its_answers(tmp_path):
    output = Location(str(tmp_path))
    hashes = [f"{i:064x}" for i in range(20_000)]
    output.write_parquet(DEFAULT_FILE, pa.table({
        HASH: hashes, "_answer": ["{}"] * len(hashes), "_finish_reason": ["stop"] * len(hashes),
        "_batch_id": ["batch_1"] * len(hashes)}, schema=CACHED))
    cache = AnswerCache.open(None, output, None, excluded=[])
    asked = pa.array([hashes[5], "f" * 64])
    assert cache.reused(asked).to_pylist() == [True, False]
    shipped = pickle.dumps(cache)
    assert len(shipped) < 5_000  # the answers' 1.3 MB of hashes stay behind
    assert pickle.loads(shipped).reused(asked).to_pylist() == [True, False]


def test_a_job_runs_its_shards_on_an_existing_dask_cluster(prefect_api, start_localbatch,
                                                           tmp_path):
    """`runner.address`: a scheduler and workers started apart, as `dask scheduler` and
    `dask worker` start them, their workers given the Prefect API to report to."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cluster = [subprocess.Popen([DASK, "scheduler", "--port", str(port), "--no-dashboard"],
                                env=env, stderr=subprocess.DEVNULL),
               subprocess.Popen([DASK, "worker", address, "--nworkers", "2", "--nthreads",
                                 "1", "--no-dashboard"], env=env, stderr=subprocess.DEVNULL)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            server = start_localbatch()
            path = job_file(tmp_path, generated_movies(90), **{
                "limits.max_requests_per_shard": 30, "runner.kind": "dask",
                "runner.address": address})
            manifest = enrich(str(path), base_url=server.base_url)
            ran = client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.task_prefixes))
    finally:
        for process in cluster:
            process.terminate()
            process.wait(timeout=30)
    assert len(manifest["shards"]) == 3 and {"scan_rows", "collect_shard"} <= ran
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 90 and (data["_status"] == "ok").all()


def dask_workers(run) -> list[psutil.Process]:
    return [p for p in psutil.Process(run.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())]


def created_once_each(base_url: str, shards: int) -> bool:
    batches = sdk_client(base_url).batches.list(limit=100).data
    created = collections.Counter((b.metadata["attempt"], b.metadata["shard"]) for b in batches)
    return created == {("1", str(shard)): 1 for shard in range(shards)}


def test_workers_killed_in_the_middle_of_a_shard_are_replaced_and_the_run_goes_on(
        prefect_api, start_localbatch, tmp_path):
    """Dask runs the task of a lost worker again on a new one; Prefect takes the task run
    back: the run ends by itself, every row ok, each shard's batch created once."""
    server = start_localbatch(Simulation(http_faults=[HttpFault(  # the first download waits
        path="/v1/files/file-", method="GET", status=503, retry_after=5, rate=1.0, times=1)]))
    path = job_file(tmp_path, generated_movies(90), **{"limits.max_requests_per_shard": 30,
                                                        "runner.kind": "dask",
                                                        "runner.workers": 2})
    started = datetime.now(UTC).isoformat()
    run = start_job([ENRICHFLOW, "run", str(path), "--base-url", server.base_url],
                    prefect_api)
    collecting = {"task_runs": {"name": {"like_": "collect shard"},
                                "state": {"type": {"any_": ["RUNNING"]}},
                                "start_time": {"after_": started}}}
    deadline = time.monotonic() + 120
    while not httpx.post(f"{prefect_api}/task_runs/filter",
                         json=collecting).raise_for_status().json():
        assert run.poll() is None and time.monotonic() < deadline, "no shard was collected"
        time.sleep(0.1)
    workers = dask_workers(run)
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGKILL)

    assert run.wait(timeout=180) == 0
    assert created_once_each(server.base_url, shards=3)
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 90 and (data["_status"] == "ok").all()


def test_a_killed_worker_leaves_the_job_resumable_without_a_second_batch(
        prefect_api, start_localbatch, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=20, chunk_size=5))
    path = job_file(tmp_path, generated_movies(90), **{"limits.max_requests_per_shard": 30,
                                                        "runner.kind": "dask",
                                                        "runner.workers": 2})
    run = start_job([ENRICHFLOW, "run", str(path), "--base-url", server.base_url],
                    prefect_api)
    journal = tmp_path / "out" / "_state" / "run.json"
    wait_for_batches(run, lambda: journal.exists() and json.loads(journal.read_text()),
                     shards=3)
    workers = dask_workers(run)
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[0].send_signal(signal.SIGKILL)
    run.send_signal(signal.SIGKILL)  # and the run with it: the re-run resumes
    run.wait()
    psutil.wait_procs(workers, timeout=30)

    enrich(str(path), base_url=server.base_url)
    assert created_once_each(server.base_url, shards=3)
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 90 and (data["_status"] == "ok").all()
