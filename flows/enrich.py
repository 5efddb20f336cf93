"""The job flow: prepare → the canary, if on → (render → upload → create → wait →
collect) per shard → merge and write part by part.

Sending (attempts, shards, batches) is `enrichflow.flows.send`; this module is the flow
itself, what it reports, and the rules around a run: one at a time per output, cancel,
failed share.
Rows whose requests failed, expired or gave an unusable answer go round again as a new
batch of just those rows, up to `limits.max_attempts`. Every side effect is journaled in
`<output>/_state/`, so running the same job again re-attaches instead of paying twice,
and answers to requests already answered are reused, so a re-run pays only for changes.

    enrichflow run configs/movies.yaml      # or: python -m enrichflow run ...
"""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Annotated, Any, Literal, get_args

import pyarrow.compute as pc
from prefect import Flow, State, flow, get_run_logger, runtime
from prefect.client.schemas.objects import FlowRun
from prefect.logging.loggers import flow_run_logger
from pydantic import Field, WithJsonSchema

from enrichflow.config import CanaryConfig, Job, ProviderKind, resolve_job
from enrichflow.errors import (
    CanaryFailedError,
    ConfigError,
    CostLimitError,
    ProviderError,
    RowsFailedError,
)
from enrichflow.flows.output import Written, write_parts
from enrichflow.flows.send import WaitMode, run_attempts, suspend
from enrichflow.provider import answered_by, cost_text, describe, open_client, provider_kind
from enrichflow.storage import Location
from enrichflow.tasks import watch
from enrichflow.tasks.api import describe_api_error, sdk_errors
from enrichflow.tasks.canary import CanaryOutcome, delete_canary_files, run_canary_task
from enrichflow.tasks.cancel import cancel_run
from enrichflow.tasks.estimate import estimate_error, estimate_error_text
from enrichflow.tasks.events import emit
from enrichflow.tasks.lease import Lease
from enrichflow.tasks.load import KEY
from enrichflow.tasks.merge import NOT_SENT
from enrichflow.tasks.prepare import Prepared, prepare_job
from enrichflow.tasks.report import publish_canary, publish_estimate, publish_results
from enrichflow.tasks.runner import Runner, open_runner
from enrichflow.tasks.spend import NOT_SENT_FOR_THE_CAP, CostCap
from enrichflow.tasks.state import RunState
from enrichflow.tasks.status import already_complete_line, complete_manifest
from enrichflow.tasks.write import finish_output, start_output

JOB_PARAMETERS = ("config_path", "output", "limit", "provider", "base_url", "model", "runner",
                  "job", "deadline")

# Prefect's run form shows `str | None` as a str/None toggle ("Property is type None") and
# refuses a null default in a plain input. So the form's optional inputs are plain ones whose
# empty value ("", 0) means "not given", and its choices are selects with a None option;
# Python callers (the CLI, the Python API) still pass None.
Text = Annotated[str | None, WithJsonSchema({"type": "string"})]
RunnerKind = Literal["threads", "dask"]


def choice_of(kind: Any) -> Any:
    """A Literal parameter that may be None, shown by the run form as one select."""
    return Annotated[kind | None, WithJsonSchema({"enum": [*get_args(kind), None]})]


ProviderChoice = choice_of(ProviderKind)
RunnerChoice = choice_of(RunnerKind)


def given(value: Any) -> Any:
    """A parameter's value, or None for the run form's empty ones ("", 0)."""
    return value or None


def cancel_batches_on_cancellation(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """A run cancelled in Prefect (the UI's Cancel, the API) while it runs cancels its
    batches too: without this, they would go on running, and billed, at the provider. A
    suspended run has no process to do it: the cancel-batches deployment does
    (`enrichflow.flows.cancelled`)."""
    cancel_batches_of(flow_run)


def cancel_batches_of(flow_run: FlowRun) -> list[str]:
    """Cancel the batches of `flow_run`, an enrich run cancelled in Prefect, and say so
    in its log; the batches cancelled. Only while the output's journal is that run's
    (`cancel_run`)."""
    log = flow_run_logger(flow_run)
    job = job_from_parameters(flow_run.parameters)
    stopped, cancelled = cancel_run(Location(job.output, job.storage_options),
                                    str(flow_run.id))
    if stopped is None:
        log.info("the run was cancelled; no unfinished run of it is journaled, so no batch "
                 "of it runs on")
        return []
    log.warning("the run was cancelled: %s; answers that finished before stay billed and "
                "are kept, and running the job again sends the rest",
                ", ".join(cancelled) + " cancelled" if cancelled else "no batch was running")
    return cancelled


def run_name() -> str:
    """A run's name in the UI: its job and, when given, its output (`movies → out/m`)."""
    parameters = runtime.flow_run.parameters
    job = PurePath(parameters["config_path"]).stem if parameters.get("config_path") else \
        Job.from_text(parameters["job"]).name
    return f"{job} → {parameters['output']}" if parameters.get("output") else job


@flow(name="enrich", flow_run_name=run_name, log_prints=True, persist_result=True,
      on_cancellation=[cancel_batches_on_cancellation])
def enrich(
    config_path: Text = "",
    output: Text = "",
    limit: Annotated[int | None, Field(ge=0),
                     WithJsonSchema({"type": "integer", "minimum": 0})] = 0,
    provider: ProviderChoice = None,
    base_url: Text = "",
    model: Text = "",
    wait_mode: WaitMode = "poll",
    force: bool = False,
    use_cache: bool = True,
    wait_for_lock: bool = False,
    canary_only: bool = False,
    runner: RunnerChoice = None,
    job: Text = "",
    deadline: Text = "",
) -> dict[str, Any]:
    """Enrich the rows of a job file's dataset through the Batch API; returns the manifest.

    Args:
        config_path: Job YAML file, relative to the repository root, e.g. configs/movies.yaml.
        output: Output directory (local path or s3:// URI); default: the job file's.
        limit: Only the first N rows; 0 or empty: all.
        provider: local, openai, azure, anthropic or gemini; default: openai when OPENAI_API_KEY
            is set, else local.
        base_url: Batch API base URL, e.g. a running `enrichflow serve`; default: the job file's.
        model: Model; default: the job file's.
        wait_mode: poll: the run waits for its batches; suspend: it suspends itself, freeing
            the worker, and the resume-ready deployment resumes it when a batch is done.
        force: Run again even if the output is complete.
        use_cache: Reuse answers to requests answered before (not paid again).
        wait_for_lock: If another run is writing the same output, wait for it to end
            instead of failing at once (only one run writes an output at a time).
        canary_only: Only send and check the canary's sample rows (the job's `canary`, or
            20 rows), then stop; their answers are kept for the full run.
        runner: Where the per-shard work runs: threads (here) or dask (the job's
            runner.address, or a LocalCluster of worker processes); default: the job's.
        job: The job itself instead of a job file: its YAML text (the Python API's jobs).
        deadline: When the rows are needed, with its time zone, e.g. 2026-12-04T07:00:00Z:
            the rows not answered limits.deadline_lead_seconds before it go through the
            synchronous API; default: the job file's.
    """
    config_path, output, limit, base_url, model, job, deadline = map(
        given, (config_path, output, limit, base_url, model, job, deadline))
    resolved = resolve_job(config_path, output, limit, provider, base_url, model, runner, job,
                           deadline)
    if wait_mode == "suspend":
        check_can_suspend(resolved)
    location = Location(resolved.output, resolved.storage_options)
    resume = resume_command(config_path, location.uri, limit, provider, base_url, model,
                            runner, deadline)
    try:
        with open_runner(resolved.runner) as shard_runner:
            return run_job(resolved, location, shard_runner, wait_mode, force, use_cache,
                           wait_for_lock, canary_only, resume)
    except sdk_errors() as exc:  # the run's state says it in the CLI's one line
        raise ProviderError(describe_api_error(exc)) from exc


def run_job(job: Job, location: Location, shard_runner: Runner, wait_mode: WaitMode,
            force: bool, use_cache: bool, wait_for_lock: bool, canary_only: bool,
            resume: dict[str, str]) -> dict[str, Any]:
    """The flow's body, with the job's runner up."""
    log = get_run_logger()
    log.info("%s: %s answers, model %s", job.name,
             answered_by(describe(job.provider, location)), job.request.model)
    prepared = prepare_job(job, use_cache, force, shard_runner.map)
    report_prepared(job, prepared)

    run_name = f"flow run {runtime.flow_run.name} ({runtime.flow_run.id})"
    with Lease.acquire(location, run_name, wait_for_lock, on_wait=log.info) as lease:
        done = None if force or canary_only else complete_manifest(location, prepared.job_key)
        if done:
            log.info(already_complete_line(job, location))
            return done
        cap = CostCap.of(job, prepared.price)
        try:
            cap.check(prepared.estimate_left(), prepared.unfinished)
        except CostLimitError as exc:
            emit("cost-cap.reached", job.name, location.uri, message=str(exc))
            raise
        if prepared.to_send.num_rows:
            with open_client(job.provider, location) as client:
                client.check_model(job.request.model)

        state, resumed = RunState.open(
            location, prepared.job_key, job.config_hash(), prepared.fingerprint,
            describe(job.provider, location), force, flow_run_id=str(runtime.flow_run.id),
            resume=resume,
            lease=lease)
        if resumed and prepared.unfinished is None:  # journaled since it was prepared
            log.info("resuming run %s from %s/_state", state.run_id, location.uri)
        canary = job.canary or CanaryConfig()
        if canary_only and state.shards:
            log.info("canary: this run has sent its batches already; nothing to check")
            return {"canary": CanaryOutcome.nothing().summary(canary)}
        passed = None if canary_only else prepared.canary_passed
        if passed and not state.shards:
            log.info("canary: this request (prompt, schema, model, parameters) passed a "
                     "canary on %s (%s of %s rows usable); its rows go in the batches, at "
                     "batch prices (canary.again: always checks every run)",
                     passed["passed_at"], passed["rows"] - passed["failed"], passed["rows"])
        if (job.canary or canary_only) and not state.shards and not passed:  # nothing sent
            outcome = check_with_canary(job, location, prepared, state, canary, wait_mode)
            if canary_only:
                return {"canary": outcome.summary(canary)}
        manifest, written = send_and_write(job, location, prepared, state, shard_runner,
                                           wait_mode, cap)
    if manifest["cost_cap_reached"]:
        emit("cost-cap.reached", job.name, location.uri, message=manifest["cost_cap_reached"])
        raise CostLimitError(f"{manifest['cost_cap_reached']}; the rows answered are written "
                             f"to {location.uri}, the others are failed as not sent: raise "
                             "max_cost_usd and run the job again to send them")
    check_failed_share(manifest, written.first_error, job.limits.max_failed_share)
    return manifest


def send_and_write(job: Job, location: Location, prepared: Prepared, state: RunState,
                   shard_runner: Runner, wait_mode: WaitMode,
                   cap: CostCap) -> tuple[dict[str, Any], Written]:
    """Send what is left to send (within the cost cap), merge every answer into the
    rows, write the output and its manifest; (the manifest, what was written)."""
    log = get_run_logger()
    with open_client(job.provider, location) as client:
        cap_reached = run_attempts(client, state, prepared, job, shard_runner, wait_mode, cap)
    start_output(location)
    written = write_parts(job, location, prepared, state,
                          NOT_SENT_FOR_THE_CAP if cap_reached else NOT_SENT)
    manifest = build_manifest(job, state, prepared, written, location, cap_reached)
    finish_output(location, written.parts, manifest)
    state.finish()
    if job.cleanup:
        state.remove_results()
    publish_results(manifest, written.first_rows, job)
    emit("run.finished", job.name, location.uri, run=state.run_id,
         rows_by_status=manifest["rows_by_status"], cost_usd=manifest["cost_usd"],
         cancelled=manifest["cancelled"])
    log.info("%s: wrote %s rows to %s (%s); cost %s%s", job.name, f"{written.rows:,}",
             location.uri, ", ".join(f"{n:,} {s}" for s, n in manifest["rows_by_status"].items()),
             cost_text(manifest["cost_usd"], manifest["provider"]),
             "; the job was cancelled: run it again to send the rest" if manifest["cancelled"]
             else "")
    if manifest["estimate_error"]:
        log.info("estimate against the bill: %s", estimate_error_text(manifest["estimate_error"]))
    return manifest, written


def check_with_canary(job: Job, location: Location, prepared: Prepared,
                      state: RunState, canary: CanaryConfig,
                      wait_mode: WaitMode) -> CanaryOutcome:
    """Answer and check the canary's sample; raise CanaryFailedError, before any of the
    job's batches is uploaded, when too much of it failed; else (or when the job was
    cancelled meanwhile) journal its answers as the run's own. In suspend mode, the run
    suspends while a canary batch runs."""
    log = get_run_logger()
    if canary.sample_size(prepared.to_send.num_rows) == 0:
        log.info("canary: fewer than 2 rows to send; nothing to check")
        return CanaryOutcome.nothing()
    with open_client(job.provider, location) as client:
        outcome = run_canary_task(client, job, prepared, canary, state.canary_intent(),
                                  state.sync_canary_batch, wait=wait_mode == "poll")
        if outcome.waiting:
            suspend(state, [client.retrieve(outcome.batch_id)],
                    job.limits.max_wait_hours, f"the canary's batch {outcome.batch_id}")
    cancelled = state.cancel_requested()  # no verdict: its answers are kept, nothing more sent
    if cancelled:
        log.warning("the job was cancelled during its canary")
    else:
        publish_canary(job.name, outcome, canary)
        failed = outcome.failed
        for key, error in zip(failed[KEY].to_pylist()[:5], failed["_error"].to_pylist()[:5],
                              strict=True):
            log.warning("canary: row %r: %s", key, error)
    usable = cancelled or outcome.passed(canary)
    if usable:
        state.save_canary(outcome.results, outcome.batch_id)
        if canary.mode == "sync":
            watch.answered(outcome.rows)
    delete_canary_files(job, location, outcome)  # after the journal: a kill leaves them
    if not usable:
        emit("canary.failed", job.name, location.uri, rows=outcome.rows,
             failed=outcome.failed.num_rows, first_error=outcome.failed["_error"][0].as_py())
        raise CanaryFailedError(
            f"{outcome.text(canary)}. The job is stopped before uploading its batches. "
            f"First failure, row {outcome.failed[KEY][0].as_py()!r}: "
            f"{outcome.failed['_error'][0].as_py()}. Fix "
            "the prompt, schema or max_tokens and check again with `enrichflow run "
            "--canary-only`")
    if not cancelled:
        log.info(outcome.text(canary))
        measured = replace(prepared.estimate, measured_output=state.canary_output())
        log.info("likely cost at batch prices: %s", measured.likely_text())
        if prepared.cache is not None and outcome.rows:
            prepared.cache.remember_canary(job.request_hash(), {
                "passed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "rows": outcome.rows, "failed": outcome.failed.num_rows})
    return outcome


def job_from_parameters(parameters: dict[str, Any]) -> Job:
    """The job of an `enrich` flow run, from its parameters (hooks, resume-ready)."""
    return resolve_job(**{name: given(parameters.get(name)) for name in JOB_PARAMETERS})


def resume_command(config_path: str | None, output: str, limit: int | None,
                   provider: str | None, base_url: str | None, model: str | None,
                   runner: str | None = None, deadline: str | None = None) -> dict[str, str]:
    """The directory and the `enrichflow run` command that resume this run, for `status`;
    a job given as a mapping is resumed by the same Python call."""
    if config_path is None:
        return {"cwd": os.getcwd(), "command": "the same enrichflow.enrich() or "
                                               "enrichflow.run() call in Python"}
    options = {"--output": output, "--limit": limit, "--provider": provider,
               "--base-url": base_url, "--model": model, "--runner": runner,
               "--deadline": deadline}
    words = ["enrichflow", "run", config_path]
    for option, value in options.items():
        if value is not None:
            words += [option, str(value)]
    return {"cwd": os.getcwd(), "command": shlex.join(words)}


def check_failed_share(manifest: dict[str, Any], first_error: str | None,
                       max_share: float) -> None:
    """Fail the run (Prefect: Failed; CLI: exit 2), its output written, when more rows
    failed than the job accepts: a run with most rows failed is not a success."""
    failed = manifest["rows_by_status"].get("failed", 0)
    if manifest["cancelled"] or not manifest["rows"] or failed / manifest["rows"] <= max_share:
        return
    raise RowsFailedError(
        f"{failed:,} of {manifest['rows']:,} rows failed, more than limits.max_failed_share "
        f"({max_share:.0%}); the output is written to {manifest['output']} (see its _error "
        f"column). First error: {first_error}")


def check_can_suspend(job: Job) -> None:
    """A suspended run has no process: its batches must live on a server that stays up,
    and nothing would act on a deadline while it is suspended."""
    if job.deadline is not None:
        raise ConfigError("wait_mode suspend cannot keep a deadline (a suspended run has no "
                          "process to act when it nears): use wait_mode poll, or remove "
                          "`deadline` from the job")
    if provider_kind(job.provider) == "local" and not job.provider.base_url:
        raise ConfigError("wait_mode suspend needs a Batch API that outlives the run: "
                          "OpenAI, or a running `enrichflow serve` given as base_url; the "
                          "embedded local server stops when the run suspends")


def report_prepared(job: Job, prepared: Prepared) -> None:
    """What the run will do, first whether it resumes one; its estimate is of what is
    left to send."""
    log = get_run_logger()
    if prepared.unfinished:
        log.info("%s: resuming run %s (journaled in %s/_state): it collects the batches "
                 "sent before and sends only the rest", job.name,
                 prepared.unfinished.run_id, prepared.unfinished.location.uri)
    unsent = prepared.unsent
    counts = pc.value_counts(unsent["_status"]).to_pylist()
    log.info("%s: %s rows loaded, %s to send, %s answered before (reused)%s", job.name,
             f"{prepared.rows:,}", f"{prepared.to_send.num_rows:,}", f"{prepared.reused:,}",
             "".join(f", {c['counts']:,} {c['values']} (not sent)" for c in counts))
    for key, error in zip(unsent[KEY].to_pylist()[:5], unsent["_error"].to_pylist()[:5],
                          strict=True):
        log.warning("row %r is not sent: %s", key, error)
    estimate = prepared.estimate_left()
    log.info("estimate:\n%s", estimate.text())
    publish_estimate(job.name, estimate)


def build_manifest(job: Job, state: RunState, prepared: Prepared, written: Written,
                   location: Location, cost_cap_reached: str | None = None) -> dict[str, Any]:
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
        "answered_by": answered_by(state.provider),
        "rows": written.rows,
        "rows_by_status": dict(written.by_status),
        "rows_reused": prepared.reused,
        "parts": written.parts,
        "cancelled": state.cancel_requested(),
        "cost_cap_reached": cost_cap_reached,
        "attempts": max((s.attempt for s in state.shards), default=0),
        "tokens": {"prompt": written.prompt_tokens, "completion": written.completion_tokens},
        "cost_usd": written.cost_usd if prepared.price else None,
        "price": asdict(prepared.price) if prepared.price else None,
        "estimate": dict(prepared.estimate.lines()),
        "estimate_error": estimate_error(prepared.estimate, written.prompt_tokens,
                                         written.cost_usd if prepared.price else None),
        "deadline": None if job.deadline is None else {
            "at": job.deadline.isoformat(timespec="seconds"), "rows_sent_now": written.sent_now,
            "cost_usd": written.cost_now_usd if prepared.price else None},
        "started_at": _iso(state.started_at),
        "finished_at": _iso(datetime.now(UTC).timestamp()),
        "shards": [asdict(s) for s in state.shards],
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")

