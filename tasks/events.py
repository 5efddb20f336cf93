"""What a run tells Prefect's event feed, for the automations a team sets up (notify on a
failed canary or a cost cap, chain a job after another's run): `enrichflow.*` events whose
resource is the output they concern, with the job as a related resource. Prefect relates
them to the flow run, its flow and deployment too; the UI's Event Feed shows them.

- `enrichflow.batch.created`: a shard's batch is created (batch, shard, rows);
- `enrichflow.batch.<status>`: a shard's batch ends, `completed`, `failed`, `expired` or
  `cancelled` (batch, shard, request counts);
- `enrichflow.canary.failed`: the canary stops the job before its batches (rows, failed,
  first error);
- `enrichflow.cost-cap.reached`: the estimate passes `max_cost_usd`, nothing is sent
  (the message);
- `enrichflow.run.finished`: the output is written (run, rows by status, cost, cancelled).
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event


def emit(event: str, job_name: str, output: str, **payload: Any) -> None:
    """Emit `enrichflow.<event>` about `output`, the job's output location."""
    emit_event(event=f"enrichflow.{event}",
               resource={"prefect.resource.id": f"enrichflow.output.{output}",
                         "prefect.resource.name": output},
               related=[{"prefect.resource.id": f"enrichflow.job.{job_name}",
                         "prefect.resource.role": "job", "prefect.resource.name": job_name}],
               payload=payload)
