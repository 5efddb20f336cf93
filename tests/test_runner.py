"""Shards on a Dask cluster (prefect-dask): a LocalCluster of 2 worker processes gives the
output the run's own threads give, on local disk and on S3, and a killed worker leaves
the job resumable without a second batch for any shard."""

from __future__ import annotations

import collections
import json
import signal
import sys
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import generated_movies, job_file, sdk_client, start_job, wait_for_batches

from flows.enrich import enrich
from localbatch import Simulation
from tasks import prepare

ENRICHFLOW = str(Path(sys.executable).with_name("enrichflow"))
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
    workers = [p for p in psutil.Process(run.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[0].send_signal(signal.SIGKILL)
    run.send_signal(signal.SIGKILL)  # and the run with it: the re-run resumes
    run.wait()
    psutil.wait_procs(workers, timeout=30)

    enrich(str(path), base_url=server.base_url)
    batches = sdk_client(server.base_url).batches.list(limit=100).data
    created = collections.Counter((b.metadata["attempt"], b.metadata["shard"]) for b in batches)
    assert created == {("1", "0"): 1, ("1", "1"): 1, ("1", "2"): 1}
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 90 and (data["_status"] == "ok").all()
