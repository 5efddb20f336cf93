"""The cancel-batches flow: cancel the batches of an enrich run cancelled in Prefect.

A run cancelled while it runs cancels its own batches (its `on_cancellation` hook). A
suspended run has no process to do so: Prefect sets it Cancelled at once, and its batches
would run on at the provider, billed. The cancel-batches deployment runs this flow on
every enrich run's `prefect.flow-run.Cancelled` event (a trigger in prefect.yaml), so a
cancel from the UI or the API holds in every state.

    python -m enrichflow.flows.cancelled FLOW_RUN_ID      # by hand
"""

from __future__ import annotations

import sys

from prefect import flow

from enrichflow.flows.enrich import cancel_batches_of
from enrichflow.tasks.events import flow_run_of


@flow(name="cancel-batches", log_prints=True)
def cancel_batches(flow_run: str) -> list[str]:
    """Cancel the batches of a cancelled enrich flow run; returns those cancelled.

    Args:
        flow_run: The cancelled run's id, or its event resource id (prefect.flow-run.ID).
    """
    return cancel_batches_of(flow_run_of(flow_run))


if __name__ == "__main__":
    cancel_batches(sys.argv[1])
