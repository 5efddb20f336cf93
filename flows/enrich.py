"""The job flow: prepare → (upload → create → wait → collect) per shard → merge → write.

Rows whose requests failed, expired or gave an unusable answer go round again as a new
batch of just those rows, up to `limits.max_attempts`. Every side effect is journaled in
`<output>/_state/`, so running the same job again re-attaches instead of paying twice,
and answers to requests already answered are reused, so a re-run pays only for changes.

    python -m flows.enrich configs/movies.yaml      # same as: enrichflow run configs/movies.yaml
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NoReturn
from uuid import UUID

import pyarrow as pa
import pyarrow.compute as pc
from openai import OpenAI
from openai.types import Batch
from prefect import Flow, State, flow, get_run_logger, runtime
from prefect.artifacts import update_progress_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.flow_runs import suspend_flow_run
from prefect.logging.loggers import flow_run_logger
from pydantic import Field

from enrichflow.config import JobConfig, LimitsConfig, load_job
from enrichflow.errors import ConfigError, RowsFailedError
from enrichflow.provider import describe, open_client, provider_kind
from enrichflow.storage import Location
from tasks.budget import TokenBudget
from tasks.cache import remember_answers
from tasks.cancel import cancel_run
from tasks.collect import ATTEMPT_RESULTS, collect_results_task, error_results
from tasks.estimate import usd
from tasks.lease import Lease
from tasks.load import KEY
from tasks.merge import merge_results_task
from tasks.plan import TOKENS, Shard, plan_shards, shard_jsonl
from tasks.prepare import Prepared, check_cost_cap, prepare_job_task
from tasks.render import CUSTOM_ID
from tasks.report import publish_estimate, publish_results, start_progress
from tasks.state import RunState, ShardRecord
from tasks.submit import create_batch_task, find_batch_task, upload_shard_task
from tasks.wait import TERMINAL, look_at_batches_task, wait_for_batches_task
from tasks.write import read_manifest, write_output_task

WaitMode = Literal["poll", "suspend"]
JOB_PARAMETERS = ("config_path", "output", "limit", "provider", "base_url", "model")


def cancel_batches_on_cancellation(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """A run cancelled in Prefect (the UI's Cancel, the API) cancels its batches too:
    without this, they would go on running, and billed, at the provider."""
    log = flow_run_logger(flow_run, flow)
    job = job_from_parameters(flow_run.parameters)
    stopped, cancelled = cancel_run(Location(job.output, job.storage_options))
    if stopped is None:
        log.info("the run was cancelled; no unfinished run of this job is journaled, so "
                 "no batch runs on")
        return
    log.warning("the run was cancelled: %s; answers that finished before stay billed and "
                "are kept, and running the job again sends the rest",
                ", ".join(cancelled) + " cancelled" if cancelled else "no batch was running")


@flow(name="enrich", log_prints=True, persist_result=True,
      on_cancellation=[cancel_batches_on_cancellation])
def enrich(
    config_path: str,
    output: str | None = None,
    limit: Annotated[int | None, Field(gt=0)] = None,
    provider: Literal["local", "openai"] | None = None,
    base_url: str | None = None,
    model: str | None = None,
    wait_mode: WaitMode = "poll",
    force: bool = False,
    use_cache: bool = True,
    wait_for_lock: bool = False,
) -> dict[str, Any]:
    """Enrich the rows of a job file's dataset through the Batch API; returns the manifest.

    Args:
        config_path: Job YAML file, relative to the repository root, e.g. configs/movies.yaml.
        output: Output directory (local path or s3:// URI); default: the job file's.
        limit: Only the first N rows; default: all.
        provider: local or openai; default: openai when OPENAI_API_KEY is set, else local.
        base_url: Batch API base URL, e.g. a running `enrichflow serve`; default: the job file's.
        model: Model; default: the job file's.
        wait_mode: poll: the run waits for its batches; suspend: it suspends itself, freeing
            the worker, and the resume-ready deployment resumes it when a batch is done.
        force: Run again even if the output is complete.
        use_cache: Reuse answers to requests answered before (not paid again).
        wait_for_lock: If another run is writing the same output, wait for it to end
            instead of failing at once (only one run writes an output at a time).
    """
    job = resolve_job(config_path, output, limit, provider, base_url, model)
    if wait_mode == "suspend":
        check_can_suspend(job)
    log = get_run_logger()
    location = Location(job.output, job.storage_options)
    prepared = prepare_job_task(job, use_cache, force)
    report_prepared(job, prepared)

    run_name = f"flow run {runtime.flow_run.name} ({runtime.flow_run.id})"
    with Lease.acquire(location, run_name, wait_for_lock, on_wait=log.info) as lease:
        done = read_manifest(location)
        if done and done.get("job_key") == prepared.job_key and not done.get("cancelled") \
                and not force:
            log.info("%s is already complete in %s; nothing sent (use --force to run it again)",
                     job.name, location.uri)
            RunState.finish_run(location, done["run_id"])  # if killed before it could
            return done
        check_cost_cap(prepared.estimate, job.max_cost_usd)

        state, resumed = RunState.open(
            location, prepared.job_key, job.config_hash(), prepared.rows.fingerprint,
            describe(job.provider, location), force, flow_run_id=str(runtime.flow_run.id),
            resume=resume_command(config_path, location.uri, limit, provider, base_url, model),
            lease=lease)
        if resumed:
            log.info("resuming run %s from %s/_state", state.run_id, location.uri)
        manifest, merged = send_and_write(job, location, prepared, state, wait_mode)
    check_failed_share(manifest, merged, job.limits.max_failed_share)
    return manifest


def send_and_write(job: JobConfig, location: Location, prepared: Prepared, state: RunState,
                   wait_mode: WaitMode) -> tuple[dict[str, Any], pa.Table]:
    """Send what is left to send, merge every answer into the rows, write the output and
    its manifest; (the manifest, the rows written)."""
    log = get_run_logger()
    with open_client(job.provider, location) as client:
        sent = run_attempts(client, state, prepared, job, wait_mode)
    results = pa.concat_tables([prepared.reused, sent])
    merged = merge_results_task(prepared.rows.table, prepared.tag, prepared.rendered.unsent,
                                results, job.request.response_format, prepared.price)
    if prepared.cache is not None:
        remember_answers(prepared.cache, prepared.rendered.requests, prepared.hashes, results)
    manifest = build_manifest(job, state, prepared, merged, location)
    write_output_task(location, merged, manifest)
    state.finish()
    publish_results(manifest, merged, job)
    log.info("%s: wrote %s rows to %s (%s); cost %s%s", job.name, f"{merged.num_rows:,}",
             location.uri, ", ".join(f"{n:,} {s}" for s, n in manifest["rows_by_status"].items()),
             "unknown" if manifest["cost_usd"] is None else usd(manifest["cost_usd"]),
             "; the job was cancelled: run it again to send the rest" if manifest["cancelled"]
             else "")
    return manifest, merged


def resolve_job(config_path: str, output: str | None = None, limit: int | None = None,
                provider: str | None = None, base_url: str | None = None,
                model: str | None = None) -> JobConfig:
    """The job file with the run's overrides applied; raises ConfigError if invalid."""
    return load_job(config_path, output=output, **{
        "dataset.limit": limit, "provider.kind": provider, "provider.base_url": base_url,
        "request.model": model})


def job_from_parameters(parameters: dict[str, Any]) -> JobConfig:
    """The job of an `enrich` flow run, from its parameters (hooks, resume-ready)."""
    return resolve_job(**{name: parameters.get(name) for name in JOB_PARAMETERS})


def resume_command(config_path: str, output: str, limit: int | None, provider: str | None,
                   base_url: str | None, model: str | None) -> dict[str, str]:
    """The directory and the `enrichflow run` command that resume this run, for `status`."""
    options = {"--output": output, "--limit": limit, "--provider": provider,
               "--base-url": base_url, "--model": model}
    words = ["enrichflow", "run", config_path]
    for option, value in options.items():
        if value is not None:
            words += [option, str(value)]
    return {"cwd": os.getcwd(), "command": shlex.join(words)}


def check_failed_share(manifest: dict[str, Any], merged: pa.Table, max_share: float) -> None:
    """Fail the run (Prefect: Failed; CLI: exit 2), its output written, when more rows
    failed than the job accepts: a run with most rows failed is not a success."""
    failed = manifest["rows_by_status"].get("failed", 0)
    if manifest["cancelled"] or not manifest["rows"] or failed / manifest["rows"] <= max_share:
        return
    first = merged.filter(pc.equal(merged["_status"], "failed"))["_error"][0].as_py()
    raise RowsFailedError(
        f"{failed:,} of {manifest['rows']:,} rows failed, more than limits.max_failed_share "
        f"({max_share:.0%}); the output is written to {manifest['output']} (see its _error "
        f"column). First error: {first}")


def check_can_suspend(job: JobConfig) -> None:
    """A suspended run has no process: its batches must live on a server that stays up."""
    if provider_kind(job.provider) == "local" and not job.provider.base_url:
        raise ConfigError("wait_mode suspend needs a Batch API that outlives the run: "
                          "OpenAI, or a running `enrichflow serve` given as base_url; the "
                          "embedded local server stops when the run suspends")


def report_prepared(job: JobConfig, prepared: Prepared) -> None:
    log = get_run_logger()
    unsent = prepared.rendered.unsent
    counts = pc.value_counts(unsent["_status"]).to_pylist()
    log.info("%s: %s rows loaded, %s to send, %s answered before (reused)%s", job.name,
             f"{prepared.rows.table.num_rows:,}", f"{prepared.to_send.num_rows:,}",
             f"{prepared.reused.num_rows:,}",
             "".join(f", {c['counts']:,} {c['values']} (not sent)" for c in counts))
    for key, error in zip(unsent[KEY].to_pylist()[:5], unsent["_error"].to_pylist()[:5],
                          strict=True):
        log.warning("row %r is not sent: %s", key, error)
    log.info("estimate:\n%s", prepared.estimate.text())
    publish_estimate(job.name, prepared.estimate)


def run_attempts(client: OpenAI, state: RunState, prepared: Prepared, job: JobConfig,
                 wait_mode: WaitMode = "poll") -> pa.Table:
    """Send the rows, then again the ones worth retrying; all results, with `_attempt`."""
    log = get_run_logger()
    limits = job.limits
    budget = TokenBudget(state.token_limit or prepared.token_budget)
    progress = start_progress(job.name)
    collected: list[pa.Table] = []
    pending = prepared.to_send
    for attempt in range(1, limits.max_attempts + 1):
        if pending.num_rows == 0:
            break
        if attempt > 1 and state.cancel_requested():
            log.warning("the job was cancelled: %s rows are not sent again",
                        f"{pending.num_rows:,}")
            break
        shards = plan_shards(pending, limits.max_requests_per_shard, limits.max_bytes_per_shard,
                             state.plan_limit(attempt, budget.plan_limit))
        log.info("attempt %d: %s rows in %d shard(s)", attempt, f"{pending.num_rows:,}",
                 len(shards))
        outcome = run_shards(client, state, attempt, pending, shards, budget, job, wait_mode,
                             progress)
        collected.append(outcome.append_column(
            "_attempt", pa.array([attempt] * outcome.num_rows, pa.int64())))
        retry = outcome.filter(pc.and_(pc.invert(outcome["_ok"]), outcome["_retryable"]))
        ok = pc.sum(outcome["_ok"]).as_py() or 0
        log.info("attempt %d: %s ok, %s failed, %s worth another attempt", attempt, f"{ok:,}",
                 f"{outcome.num_rows - ok:,}", f"{retry.num_rows:,}")
        pending = pending.filter(pc.is_in(pending[CUSTOM_ID], value_set=retry["_custom_id"]))
    return pa.concat_tables(collected) if collected else ATTEMPT_RESULTS.empty_table()


@dataclass
class ShardRun:
    """One shard of an attempt on its way through upload, batch, wait and collect."""

    shard: Shard
    record: ShardRecord
    custom_ids: list[str]


def run_shards(client: OpenAI, state: RunState, attempt: int, pending: pa.Table,
               shards: list[Shard], budget: TokenBudget, job: JobConfig, wait_mode: WaitMode,
               progress: UUID) -> pa.Table:
    """Run one attempt's shards, starting each only when it fits the enqueued-token
    budget, and collect (and journal) each as soon as its batch is finished. A shard
    refused for `token_limit_exceeded` is cut into smaller shards under the limit the
    refusal named (or, refused alone, into halves), or waits for running batches and
    goes again; a refusal is never one of its rows' attempts. In `suspend` mode the run,
    rather than waiting, suspends itself until the resume-ready deployment finds a batch
    of it finished. After a cancel, no shard is started: their rows are results with the
    cancel as their error."""
    log = get_run_logger()
    limits = job.limits
    tables: list[pa.Table] = []
    queue: deque[ShardRun] = deque()
    for shard in shards:
        queue.extend(_still_to_run(state, attempt, pending, shard, tables))
    running: dict[str, ShardRun] = {}  # by batch id
    while queue or running:
        if any(not run.record.batch_id for run in queue) and state.cancel_requested():
            unsent = [run for run in queue if not run.record.batch_id]
            log.warning("the job was cancelled: %d shard(s) of attempt %d are not sent",
                        len(unsent), attempt)
            tables.extend(error_results(run.custom_ids, None, "cancelled before it was sent",
                                        True) for run in unsent)
            queue = deque(run for run in queue if run.record.batch_id)  # re-attach to these
        starting = []
        while queue and budget.fits(queue[0].shard.tokens):
            starting.append(queue.popleft())
            budget.take(starting[-1].shard.tokens)
        for run in start_shards(client, state, starting, pending, job.request.endpoint):
            running[run.record.batch_id] = run
        if not running:
            continue
        if wait_mode == "suspend":
            batches = look_at_batches_task(client, list(running))
        else:
            batches = wait_for_batches_task(client, list(running), limits.poll_interval_min,
                                            limits.poll_interval_max, limits.max_wait_hours)
        for batch in batches:
            counts = batch.request_counts
            state.update(running[batch.id].record, batch_status=batch.status,
                         request_counts=counts.model_dump() if counts else None)
        update_progress_artifact(progress, state.progress(attempt))
        finished = [batch for batch in batches if batch.status in TERMINAL]
        if not finished and wait_mode == "suspend":
            suspend(state, limits.max_wait_hours)
        for batch in finished:
            run = running.pop(batch.id)
            budget.release(run.shard.tokens)
            refusal = _token_limit_refusal(batch)
            if refusal:
                again = _after_refusal(state, attempt, pending, run, batch, refusal, budget,
                                       limits, others_running=bool(running))
                if again:
                    queue.extendleft(reversed(again))
                    continue
            table = collect_results_task(client, batch, run.custom_ids,
                                         job.request.response_format)
            state.save_results(run.record, table)
            tables.append(table)
            ok = pc.sum(table["_ok"]).as_py() or 0
            log.info("%s: batch %s is %s; collected %s ok, %s failed", run.record.name,
                     batch.id, batch.status, f"{ok:,}", f"{table.num_rows - ok:,}")
    return pa.concat_tables(tables)


def start_shards(client: OpenAI, state: RunState, starting: list[ShardRun],
                 pending: pa.Table, endpoint: str) -> list[ShardRun]:
    """Give each shard of `starting` its batch, exactly once: re-attach to a journaled
    batch or to one created just before a crash (found by its metadata), else upload and
    create, concurrently. The tasks get and return values; the flow journals before and
    after each side effect."""
    log = get_run_logger()
    for run in starting:
        record = run.record
        if record.batch_id:
            log.info("%s: re-attaching to batch %s", record.name, record.batch_id)
        elif record.status == "creating":
            found = find_batch_task(client, state.batch_metadata(record), state.started_at)
            if found:
                log.info("%s: found batch %s created before a crash", record.name, found.id)
                state.update(record, batch_id=found.id, status="submitted")
    uploads = []
    for run in starting:
        record = run.record
        if not record.batch_id and not record.file_id:
            orphans_since = state.started_at if record.status == "uploading" else None
            state.update(record, status="uploading")
            # the JSONL is cut here rather than kept: only shards being uploaded hold theirs
            uploads.append((run, upload_shard_task.submit(
                client, state.upload_name(record), shard_jsonl(pending, run.shard),
                orphans_since)))
    for run, uploaded in uploads:
        state.update(run.record, file_id=uploaded.result(), status="uploaded")
        log.info("%s: uploaded %s rows (%s bytes) as %s", run.record.name,
                 f"{run.record.rows:,}", f"{run.record.bytes:,}", run.record.file_id)
    creates = []
    for run in starting:
        record = run.record
        if not record.batch_id:
            state.update(record, status="creating")
            creates.append((run, create_batch_task.submit(
                client, record.file_id, endpoint, state.batch_metadata(record),
                state.started_at)))
    for run, created in creates:
        batch = created.result()
        state.update(run.record, batch_id=batch.id, status="submitted",
                     batch_status=batch.status)
        log.info("%s: created batch %s", run.record.name, batch.id)
    return starting


def _after_refusal(state: RunState, attempt: int, pending: pa.Table, run: ShardRun,
                   batch: Batch, refusal: str, budget: TokenBudget, limits: LimitsConfig,
                   others_running: bool) -> list[ShardRun]:
    """What goes again after a `token_limit_exceeded`: the shard cut into shards under
    the limit the refusal named (or in halves, if it was refused alone although it fits:
    the provider counts more than our estimate), or the shard itself once running
    batches are done; nothing when a single row was refused alone (it fails)."""
    log = get_run_logger()
    state.learn_token_limit(budget.learn(refusal) or budget.limit)
    cap = budget.plan_limit
    too_big = cap is not None and run.shard.tokens > cap
    if run.shard.rows > 1 and (too_big or not others_running):
        pieces = _split(state, attempt, pending, run,
                        cap if too_big else run.shard.tokens // 2, limits)
        log.warning("%s: batch %s refused (token_limit_exceeded, limit %s): its rows go on "
                    "as %d smaller shards", run.record.name, batch.id,
                    f"{budget.limit:,}" if budget.limit else "unknown", len(pieces))
        return pieces
    if others_running:
        log.warning("%s: batch %s refused (token_limit_exceeded); it waits for running "
                    "batches and goes again", run.record.name, batch.id)
        state.update(run.record, batch_id=None, status="uploaded",
                     submission=run.record.submission + 1)
        return [run]
    return []


def _still_to_run(state: RunState, attempt: int, pending: pa.Table, shard: Shard,
                  tables: list[pa.Table]) -> list[ShardRun]:
    """What a planned shard still needs: nothing if collected (its results go to
    `tables`), the pieces it was cut into if it was split, else itself."""
    record = state.record(attempt, shard.index, shard.rows, shard.bytes,
                          hashlib.sha256(shard_jsonl(pending, shard)).hexdigest())
    if record.status == "collected":
        tables.append(state.load_results(record))
        return []
    if record.status == "split":
        return [run for piece in state.pieces(record)
                for run in _still_to_run(state, attempt, pending,
                                         _shard_of(pending, piece), tables)]
    ids = pending[CUSTOM_ID].slice(shard.start, shard.rows).to_pylist()
    return [ShardRun(shard, record, ids)]


def _shard_of(pending: pa.Table, piece: ShardRecord) -> Shard:
    tokens = pc.sum(pending[TOKENS].slice(piece.start, piece.rows)).as_py() or 0
    return Shard(piece.shard, piece.start, piece.start + piece.rows, piece.bytes, tokens)


def _split(state: RunState, attempt: int, pending: pa.Table, run: ShardRun, cap: int,
           limits: LimitsConfig) -> list[ShardRun]:
    """Cut a refused shard into shards of at most `cap` estimated tokens, journaled
    before the refused one is marked split, so a kill in between loses no row."""
    part = pending.slice(run.shard.start, run.shard.rows)
    cap = max(cap, pc.max(part[TOKENS]).as_py())  # a row is never cut
    first = state.next_shard(attempt)
    runs = []
    for i, cut in enumerate(plan_shards(part, limits.max_requests_per_shard,
                                        limits.max_bytes_per_shard, cap)):
        shard = Shard(first + i, run.shard.start + cut.start, run.shard.start + cut.end,
                      cut.bytes, cut.tokens)
        record = state.record(attempt, shard.index, shard.rows, shard.bytes,
                              hashlib.sha256(shard_jsonl(pending, shard)).hexdigest(),
                              start=shard.start, parent=run.record.shard)
        runs.append(ShardRun(shard, record,
                             pending[CUSTOM_ID].slice(shard.start, shard.rows).to_pylist()))
    state.update(run.record, status="split", batch_id=None)
    return runs


def suspend(state: RunState, max_wait_hours: float) -> NoReturn:
    """Suspend the run while its batches run (suspend mode): the process exits, the worker
    is free; a resumed run starts over from the journal, so nothing is submitted twice."""
    state.suspensions += 1
    state.save()
    running = [r.name for r in state.shards if r.batch_id and r.status != "collected"]
    get_run_logger().info("waiting for %s: suspending the run, which frees the worker; the "
                          "resume-ready deployment resumes it when one of them is finished",
                          ", ".join(running))
    suspend_flow_run(key=f"{state.run_id}-wait-{state.suspensions}",
                     timeout=int(max_wait_hours * 3600))
    raise AssertionError("unreachable: suspend_flow_run ends the run")


def _token_limit_refusal(batch: Batch) -> str | None:
    if batch.status != "failed" or not batch.errors or not batch.errors.data:
        return None
    error = batch.errors.data[0]
    return error.message if error.code == "token_limit_exceeded" else None


def build_manifest(job: JobConfig, state: RunState, prepared: Prepared, merged: pa.Table,
                   location: Location) -> dict[str, Any]:
    statuses = pc.value_counts(merged["_status"]).to_pylist()
    cost = (pc.sum(merged["_cost_usd"]).as_py() or 0.0) if prepared.price else None
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
        "rows_reused": prepared.reused.num_rows,
        "cancelled": state.cancel_requested(),
        "attempts": max((s.attempt for s in state.shards), default=0),
        "tokens": {"prompt": pc.sum(merged["_prompt_tokens"]).as_py() or 0,
                   "completion": pc.sum(merged["_completion_tokens"]).as_py() or 0},
        "cost_usd": cost,
        "price": asdict(prepared.price) if prepared.price else None,
        "estimate": dict(prepared.estimate.lines()),
        "started_at": _iso(state.started_at),
        "finished_at": _iso(datetime.now(UTC).timestamp()),
        "shards": [asdict(s) for s in state.shards],
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    from enrichflow.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
