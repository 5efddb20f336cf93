"""Prepare and collect of a 1,000,000-row movies job on threads vs a Dask LocalCluster.

The dataset is 10 Parquet files (data/make_movies.py's movies), so that prepare's scan
can be cut into pieces of whole files. Each phase runs in a Prefect flow on each runner,
side by side in one run: prepare (read, render, count tokens, plan), again with an answer
cache as large as the table (every row looked up in it), and collect (download each
finished batch's output, check and type the answers, write the shard's results).
The batches are made by a local mock server first. Cluster start-up (workers importing
the steps included) is printed apart from the phases.

    .venv/bin/python bench/runner_scale.py [--rows 1000000] [--workers 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from openai import OpenAI
from prefect import flow

from enrichflow.config import ProviderConfig, RunnerConfig, load_job
from enrichflow.storage import Location
from enrichflow.tasks.cache import CACHED, DEFAULT_FILE, HASH
from enrichflow.tasks.collect import collect_shard_task
from enrichflow.tasks.load import ROW, RowReader
from enrichflow.tasks.plan import jsonl
from enrichflow.tasks.prepare import prepare_job
from enrichflow.tasks.render import CUSTOM_ID, render_requests
from enrichflow.tasks.runner import open_runner
from enrichflow.tasks.state import ShardRecord
from localbatch import LocalBatchServer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data"))
from make_movies import movies  # noqa: E402

FILES = 10


def dataset(rows: int, work: Path) -> Path:
    folder = work / f"movies-{rows}"
    if not folder.exists():
        table = pa.Table.from_pylist(movies(rows))
        folder.mkdir(parents=True)
        size = -(-rows // FILES)
        for i in range(FILES):
            pq.write_table(table.slice(i * size, size), folder / f"part-{i:02d}.parquet")
    return folder


def job_file(folder: Path, work: Path) -> Path:
    job = yaml.safe_load((REPO / "configs" / "movies.yaml").read_text())
    job["dataset"]["path"] = str(folder)
    job["output"] = str(work / "out")
    job.pop("canary", None)
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@flow(name="bench prepare", log_prints=True)
def prepare_phase(path: str, runner: RunnerConfig,
                  use_cache: bool = False) -> tuple[float, float, float, object]:
    """(cluster start-up seconds, prepare seconds, CPU seconds of this process in it,
    what prepare found)."""
    started = time.perf_counter()
    with open_runner(runner) as shard_runner:
        ready, cpu = time.perf_counter(), time.process_time()
        prepared = prepare_job(load_job(path), use_cache=use_cache, calls=shard_runner.map)
        return (ready - started, time.perf_counter() - ready, time.process_time() - cpu,
                prepared)


@flow(name="bench collect", log_prints=True)
def collect_phase(runner: RunnerConfig, calls: list[dict]) -> tuple[float, float, float, int]:
    """(cluster start-up seconds, collect seconds, CPU seconds of this process in it,
    rows collected ok)."""
    started = time.perf_counter()
    with open_runner(runner) as shard_runner:
        ready, cpu = time.perf_counter(), time.process_time()
        collected = shard_runner.map(collect_shard_task, calls)
        return (ready - started, time.perf_counter() - ready, time.process_time() - cpu,
                sum(c.ok for c in collected))


def keep_other_answers(output: Location, count: int) -> None:
    """An answer cache of `count` answers to other requests (a cache shared between
    jobs): every row is looked up, none is reused."""
    hashes = [secrets.token_hex(32) for _ in range(count)]
    output.write_parquet(DEFAULT_FILE, pa.table({
        HASH: hashes, "_answer": ["{}"] * count, "_finish_reason": ["stop"] * count,
        "_batch_id": ["batch_other"] * count}, schema=CACHED))


def finished_batches(path: str, prepared, server: LocalBatchServer) -> list[dict]:
    """Every shard of the job as a batch the mock server has finished; the collect
    calls for them."""
    job = load_job(path)
    client = OpenAI(base_url=server.base_url, api_key="localbatch")
    shards = []
    with closing(RowReader(prepared.source)) as reader:
        for shard in prepared.shards:
            rows = prepared.to_send[ROW].slice(shard.start, shard.rows).combine_chunks()
            requests = render_requests(reader.take(rows), job.request, prepared.tag).requests
            file_id = client.files.create(file=("shard.jsonl", jsonl(requests)),
                                          purpose="batch").id
            batch = client.batches.create(input_file_id=file_id, endpoint=job.request.endpoint,
                                          completion_window="24h")
            shards.append((shard, rows, requests[CUSTOM_ID].combine_chunks(), batch.id))
    calls = []
    location = Location(str(Path(job.output) / "bench"))
    provider = ProviderConfig(kind="local", base_url=server.base_url)
    for shard, rows, ids, batch_id in shards:
        while (batch := client.batches.retrieve(batch_id)).status != "completed":
            time.sleep(1)
        record = ShardRecord(1, shard.index, shard.rows, shard.bytes, "")
        location.write_parquet(record.requests_name, pa.table({ROW: rows, CUSTOM_ID: ids}))
        calls.append({"provider": provider, "location": location, "batch": batch,
                      "record": record, "request": job.request})
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="runner-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = str(job_file(dataset(args.rows, work), work))
    runners = {"threads": RunnerConfig(),
               "dask": RunnerConfig(kind="dask", workers=args.workers)}

    prepare = {name: prepare_phase(path, runner) for name, runner in runners.items()}
    rows = {name: p[3].to_send.num_rows for name, p in prepare.items()}
    assert rows["threads"] == rows["dask"] == args.rows, rows
    keep_other_answers(Location(load_job(path).output), args.rows)
    cached = {name: prepare_phase(path, runner, use_cache=True)
              for name, runner in runners.items()}
    with LocalBatchServer(work / "localbatch") as server:
        calls = finished_batches(path, prepare["threads"][3], server)
        collect = {name: collect_phase(runner, calls) for name, runner in runners.items()}
    assert all(c[3] == args.rows for c in collect.values()), collect

    print(f"rows: {args.rows:,} in {FILES} Parquet files; dask: a LocalCluster of "
          f"{args.workers} worker processes")
    for phase, timings in (("prepare", prepare),
                           (f"prepare, {args.rows:,} other answers in the cache", cached),
                           ("collect", collect)):
        (_, threads, cpu), (start_up, dask, _) = timings["threads"][:3], timings["dask"][:3]
        print(f"{phase}: threads {threads:6.1f} s ({cpu / threads:.1f} cores busy in this "
              f"process), dask {dask:6.1f} s (+{start_up:.1f} s cluster start-up): "
              f"threads / dask = {threads / dask:.2f}x")


if __name__ == "__main__":
    main()
