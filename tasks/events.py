"""What a run tells Prefect's event feed, for the automations a team sets up (notify on a
failed canary or a cost cap, chain a job after another's run): `enrichflow.*` events whose
resource is the output they concern, with the job as a related resource. Prefect relates
them to the flow run, its flow and deployment too; the UI's Event Feed shows them.

- `enrichflow.batch.created`: a shard's batch is created (batch, shard, rows);
- `enrichflow.batch.<status>`: a shard's batch ends, `completed`, `failed`, `expired` or
  `cancelled` (batch, shard, request counts);
- `enrichflow.canary.failed`: the canary stops the job before its batches (rows, failed,
  first error);
- `enrichflow.cost-cap.reached`: the estimate passes `max_cost_usd`, nothing is sent; or
  what a run paid leaves no room under it for the next batch, the rest is not sent
  (the message);
- `enrichflow.run.finished`: the output is written (run, rows by status, cost, cancelled).

The deployments that Prefect's own events trigger (cancel-batches, rerun-crashed) read the
flow run an event is about with `flow_run_of`.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.events import emit_event


def emit(event: str, job_name: str, output: str, **payload: Any) -> None:
    """Emit `enrichflow.<event>` about `output`, the job's output location."""
    emit_event(event=f"enrichflow.{event}",
               resource={"prefect.resource.id": f"enrichflow.output.{output}",
                         "prefect.resource.name": output},
               related=[{"prefect.resource.id": f"enrichflow.job.{job_name}",
                         "prefect.resource.role": "job", "prefect.resource.name": job_name}],
               payload=payload)


def flow_run_of(reference: str) -> FlowRun:
    """The flow run that a trigger's event is about: `reference` is its id, or its event
    resource id (`prefect.flow-run.ID`, what `{{ event.resource.id }}` renders)."""
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_flow_run(UUID(reference.removeprefix("prefect.flow-run.")))
