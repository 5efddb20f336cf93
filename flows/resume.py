"""The resume-ready flow: resume suspended job runs whose batches have finished.

Runs started with `wait_mode=suspend` suspend themselves while their batches run, which
frees the worker. This flow, deployed on an interval schedule, looks at each suspended
`enrich` run's journal and asks the Batch API about its batches; when one is done, it
resumes the run, which then collects, sends what is left, and writes. OpenAI's batch
webhooks, received by `enrichflow webhooks` (`resume_runs_waiting_for`), resume a run
within seconds of its batch's end; this flow's schedule stays the fallback.

    python -m enrichflow.flows.resume          # once, by hand
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.flow_runs import resume_flow_run
from prefect.variables import Variable

from enrichflow.flows.enrich import job_from_parameters
from enrichflow.provider import open_client
from enrichflow.storage import Location
from enrichflow.tasks import as_task
from enrichflow.tasks.ledger import renew_leases
from enrichflow.tasks.state import RunState
from enrichflow.tasks.submit import awaited_batches
from enrichflow.tasks.wait import TERMINAL, look_at_batches

logger = logging.getLogger(__name__)  # outside a flow run: the webhook receiver
UNREACHABLE = "enrichflow_unreachable_runs"  # run id -> when it was reported unreachable
REPORT_AGAIN_SECONDS = 24 * 3600


def reasons_to_resume(parameters: dict) -> list[str]:
    """What a suspended run with these parameters can move on with: its shards whose
    batch finished since it last collected or runs past the job's max_wait_hours, or a
    cancel request; empty if nothing."""
    job = job_from_parameters(parameters)
    location = Location(job.output, job.storage_options)
    state = RunState.load(location)
    if state is None:
        return ["nothing is journaled: it starts over and sees for itself"]
    if state.cancel_requested():
        return ["it was cancelled"]
    with open_client(job.provider, location) as client:
        try:
            waiting = awaited_batches(client, state)
            batches = look_at_batches(client, [batch_id for _, batch_id in waiting])
        except Exception as exc:
            raise RuntimeError(f"the Batch API at {client.base_url} answered "
                               f"{type(exc).__name__}: {exc}") from exc
    overdue = time.time() - job.limits.max_wait_hours * 3600
    return [f"{name}: batch {b.id} is {b.status}" if b.status in TERMINAL else
            f"{name}: batch {b.id} runs past limits.max_wait_hours: the run ends, saying so"
            for (name, _), b in zip(waiting, batches, strict=True)
            if b.status in TERMINAL or b.created_at < overdue]


reasons_to_resume_task = as_task(reasons_to_resume, "check suspended run")


def keep_tokens(parameters: dict) -> int:
    """Renew the token leases of a suspended run's running batches (`tasks.ledger`): it
    holds its share of the organisation's queue across its suspension; how many."""
    job = job_from_parameters(parameters)
    state = RunState.load(Location(job.output, job.storage_options))
    return renew_leases(state) if state else 0


def suspended_runs(flow_name: str = "enrich") -> list[FlowRun]:
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                name=FlowRunFilterStateName(any_=["Suspended"]))))


def resume_runs_waiting_for(batch_id: str, flow_name: str = "enrich") -> list[str]:
    """Resume the suspended runs whose journal awaits `batch_id` (a webhook said it has
    ended: nothing need ask the provider); their ids. A run whose journal cannot be read
    is left to resume-ready, which reports it."""
    resumed = []
    for run in suspended_runs(flow_name):
        try:
            job = job_from_parameters(run.parameters)
            state = RunState.load(Location(job.output, job.storage_options))
        except Exception as exc:
            logger.warning("cannot read the journal of suspended run %s (%s): %s", run.name,
                           run.id, exc)
            continue
        if state is not None and batch_id in {r.batch_id for r in state.awaited()}:
            resume_flow_run(run.id)
            resumed.append(str(run.id))
            logger.info("resumed %s (%s): its batch %s has ended", run.name, run.id, batch_id)
    return resumed


@flow(name="resume-ready", log_prints=True)
def resume_ready(flow_name: str = "enrich") -> list[str]:
    """Resume the suspended runs of `flow_name` that have a finished batch; their ids.

    Every suspended run is looked at, even when looking at one fails. A run that cannot
    be looked at (its provider is down) fails this run the first time and once a day
    after, not on every pass: `UNREACHABLE`, a Prefect variable, keeps when each was
    last reported.

    Args:
        flow_name: The flow whose suspended runs to look at.
    """
    log = get_run_logger()
    suspended = suspended_runs(flow_name)
    reported = Variable.get(UNREACHABLE, default={})
    still_reported, resumed, failed = {}, [], []
    for run in suspended:
        try:
            reasons = reasons_to_resume_task(run.parameters)
        except Exception as exc:
            last = reported.get(str(run.id))
            if last is not None and time.time() - last < REPORT_AGAIN_SECONDS:
                still_reported[str(run.id)] = last
                log.warning("still cannot look at suspended run %s (%s), reported at %s: %s",
                            run.name, run.id, _iso(last), exc)
                continue
            still_reported[str(run.id)] = time.time()
            failed.append(f"{run.name} ({run.id}): {exc}")
            log.error("cannot look at suspended run %s (%s): %s", run.name, run.id, exc)
            continue
        if reasons:
            resume_flow_run(run.id)
            resumed.append(str(run.id))
            log.info("resumed %s (%s): %s", run.name, run.id, "; ".join(reasons))
        else:
            log.info("%s (%s) keeps waiting: none of its running batches is finished (%d "
                     "token lease(s) renewed)", run.name, run.id, keep_tokens(run.parameters))
    if still_reported != reported:
        Variable.set(UNREACHABLE, still_reported, overwrite=True)
    log.info("%d suspended run(s), %d resumed, %d could not be looked at", len(suspended),
             len(resumed), len(still_reported))
    if failed:
        raise RuntimeError(f"{len(failed)} suspended run(s) could not be looked at (reported "
                           "again in a day if it lasts):\n" + "\n".join(failed))
    return resumed


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    resume_ready()
