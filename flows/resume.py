"""The resume-ready flow: resume suspended job runs whose batches have finished.

Runs started with `wait_mode=suspend` suspend themselves while their batches run, which
frees the worker. This flow, deployed on an interval schedule, looks at each suspended
`enrich` run's journal and asks the Batch API about its batches; when one is done, it
resumes the run, which then collects, sends what is left, and writes.

    python -m flows.resume          # once, by hand
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
)
from prefect.flow_runs import resume_flow_run

from enrichflow.provider import open_client
from enrichflow.storage import Location
from flows.enrich import resolve_job
from tasks import as_task
from tasks.state import RunState
from tasks.wait import any_batch_finished

JOB_PARAMETERS = ("config_path", "output", "limit", "provider", "base_url", "model")


def ready_to_resume(parameters: dict) -> bool:
    """Whether the suspended run with these parameters has a finished batch."""
    job = resolve_job(**{k: parameters.get(k) for k in JOB_PARAMETERS})
    location = Location(job.output, job.storage_options)
    state = RunState.load(location)
    if state is None:
        return True  # nothing journaled: let the run start over and see for itself
    with open_client(job.provider, location) as client:
        return any_batch_finished(client, state)


ready_to_resume_task = as_task(ready_to_resume, "check suspended run")


@flow(name="resume-ready", log_prints=True)
def resume_ready(flow_name: str = "enrich") -> list[str]:
    """Resume the suspended runs of `flow_name` that have a finished batch; their ids."""
    log = get_run_logger()
    with get_client(sync_client=True) as prefect_api:
        suspended = prefect_api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                name=FlowRunFilterStateName(any_=["Suspended"]))))
    resumed = []
    for run in suspended:
        if ready_to_resume_task(run.parameters):
            resume_flow_run(run.id)
            resumed.append(str(run.id))
            log.info("resumed %s (%s): a batch of it is done", run.name, run.id)
        else:
            log.info("%s (%s) keeps waiting: none of its batches is done", run.name, run.id)
    log.info("%d suspended run(s), %d resumed", len(suspended), len(resumed))
    return resumed


if __name__ == "__main__":
    resume_ready()
