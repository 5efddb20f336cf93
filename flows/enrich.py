"""The job flow: load → plan → render → upload → create → wait → collect → merge → write.

Rows whose requests failed, expired or gave an unusable answer go round again as a new
batch of just those rows, up to `limits.max_attempts`. Every side effect is journaled in
`<output>/_state/`, so running the same job again re-attaches instead of paying twice.

    python -m flows.enrich configs/movies.yaml      # same as: enrichflow run configs/movies.yaml
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from openai import OpenAI
from prefect import flow, get_run_logger

from enrichflow.config import JobConfig, load_job
from enrichflow.provider import describe, open_client
from enrichflow.storage import Location
from tasks.collect import ATTEMPT_RESULTS, collect_results_task
from tasks.load import KEY, load_rows_task
from tasks.merge import check_answer_columns, merge_results_task
from tasks.plan import plan_shards, shard_jsonl
from tasks.render import CUSTOM_ID, render_requests_task
from tasks.state import RunState
from tasks.submit import submit_shard_task
from tasks.wait import poll_delays, poll_retries, wait_for_batch_task
from tasks.write import read_manifest, write_output_task


@flow(name="enrich", log_prints=True)
def enrich(
    config_path: str,
    output: str | None = None,
    limit: int | None = None,
    provider: Literal["local", "openai"] | None = None,
    base_url: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Enrich the rows of a job file's dataset through the Batch API; returns the manifest."""
    job = resolve_job(config_path, output, limit, provider, base_url)
    log = get_run_logger()
    location = Location(job.output, job.storage_options)
    rows = load_rows_task(job.dataset, job.storage_options)
    check_answer_columns(rows.table, job.request.response_format)
    job_key = hashlib.sha256(f"{job.config_hash()}:{rows.fingerprint}".encode()).hexdigest()[:24]
    tag = job_key[:8]
    rendered = render_requests_task(rows.table, job.request, tag, job.dataset.path,
                                    job.storage_options)
    unsent = pc.value_counts(rendered.unsent["_status"]).to_pylist()
    log.info("%s: %s rows loaded, %s to send%s", job.name, f"{rows.table.num_rows:,}",
             f"{rendered.requests.num_rows:,}",
             "".join(f", {u['counts']:,} {u['values']} (not sent)" for u in unsent))
    for key, error in zip(rendered.unsent[KEY].to_pylist()[:5],
                          rendered.unsent["_error"].to_pylist()[:5], strict=True):
        log.warning("row %r is not sent: %s", key, error)

    done = read_manifest(location)
    if done and done.get("job_key") == job_key and not force:
        log.info("%s is already complete in %s; nothing sent (use --force to run it again)",
                 job.name, location.uri)
        return done

    state, resumed = RunState.open(location, job_key, job.config_hash(), rows.fingerprint,
                                   describe(job.provider, location), force)
    if resumed:
        log.info("resuming run %s from %s/_state", state.run_id, location.uri)
    with open_client(job.provider, location) as client:
        results = run_attempts(client, state, rendered.requests, job)

    merged = merge_results_task(rows.table, tag, rendered.unsent, results,
                                job.request.response_format)
    manifest = build_manifest(job, state, merged, location)
    write_output_task(location, merged, manifest)
    state.finish()
    counts = manifest["rows_by_status"]
    log.info("%s: wrote %s rows to %s (%s)", job.name, f"{merged.num_rows:,}", location.uri,
             ", ".join(f"{n:,} {s}" for s, n in counts.items()))
    return manifest


def resolve_job(config_path: str, output: str | None = None, limit: int | None = None,
                provider: str | None = None, base_url: str | None = None) -> JobConfig:
    """The job file with the run's overrides applied; raises ConfigError if invalid."""
    return load_job(config_path, output=output, **{
        "dataset.limit": limit, "provider.kind": provider, "provider.base_url": base_url})


def run_attempts(client: OpenAI, state: RunState, requests: pa.Table, job: JobConfig) -> pa.Table:
    """Send the rows, then again the ones worth retrying; all results, with `_attempt`."""
    log = get_run_logger()
    limits = job.limits
    delays = poll_delays(limits.poll_interval_min, limits.poll_interval_max)
    wait = wait_for_batch_task.with_options(
        retries=poll_retries(delays, limits.max_wait_hours), retry_delay_seconds=delays)
    collected: list[pa.Table] = []
    pending = requests
    for attempt in range(1, limits.max_attempts + 1):
        if pending.num_rows == 0:
            break
        if attempt > 1 and state.cancel_requested():
            log.warning("the job was cancelled: %s rows are not sent again",
                        f"{pending.num_rows:,}")
            break
        shards = plan_shards(pending, limits.max_requests_per_shard, limits.max_bytes_per_shard)
        log.info("attempt %d: %s rows in %d shard(s)", attempt, f"{pending.num_rows:,}",
                 len(shards))
        this_attempt, running = [], []
        for shard in shards:
            payload = shard_jsonl(pending, shard)
            record = state.record(attempt, shard.index, shard.rows, shard.bytes,
                                  hashlib.sha256(payload).hexdigest())
            if record.status == "collected":
                this_attempt.append(state.load_results(record))
                continue
            ids = pending[CUSTOM_ID].slice(shard.start, shard.rows).to_pylist()
            submitted = submit_shard_task.submit(client, state, record, payload,
                                                 job.request.endpoint)
            finished = wait.submit(client, state, record, wait_for=[submitted])
            results = collect_results_task.submit(client, finished, ids,
                                                  job.request.response_format)
            running.append((record, results))
        for record, results in running:
            table = results.result()
            state.save_results(record, table)
            this_attempt.append(table)
        outcome = pa.concat_tables(this_attempt)
        collected.append(outcome.append_column(
            "_attempt", pa.array([attempt] * outcome.num_rows, pa.int64())))
        retry = outcome.filter(pc.and_(pc.invert(outcome["_ok"]), outcome["_retryable"]))
        ok = pc.sum(outcome["_ok"]).as_py() or 0
        log.info("attempt %d: %s ok, %s failed, %s worth another attempt", attempt, f"{ok:,}",
                 f"{outcome.num_rows - ok:,}", f"{retry.num_rows:,}")
        pending = pending.filter(pc.is_in(pending[CUSTOM_ID], value_set=retry["_custom_id"]))
    if not collected:
        return ATTEMPT_RESULTS.empty_table()
    return pa.concat_tables(collected)


def build_manifest(job: JobConfig, state: RunState, merged: pa.Table,
                   location: Location) -> dict[str, Any]:
    statuses = pc.value_counts(merged["_status"]).to_pylist()
    return {
        "job": job.name,
        "job_key": state.job_key,
        "run_id": state.run_id,
        "config_hash": state.config_hash,
        "dataset": job.dataset.path,
        "dataset_fingerprint": state.dataset_fingerprint,
        "output": location.uri,
        "model": job.request.model,
        "provider": state.provider,
        "rows": merged.num_rows,
        "rows_by_status": {s["values"]: s["counts"] for s in statuses},
        "attempts": max((s.attempt for s in state.shards), default=0),
        "tokens": {"prompt": pc.sum(merged["_prompt_tokens"]).as_py() or 0,
                   "completion": pc.sum(merged["_completion_tokens"]).as_py() or 0},
        "started_at": _iso(state.started_at),
        "finished_at": _iso(datetime.now(UTC).timestamp()),
        "shards": [asdict(s) for s in state.shards],
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    from enrichflow.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
