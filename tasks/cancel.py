"""Cancel a job: its run sends nothing more, and its unfinished batches are cancelled.

Answers that finished before the cancel stay billed; the run collects and keeps them.
The batches' enqueued tokens go back to the organisation's ledger (`tasks.ledger`).
Used by `enrichflow cancel` and by the flow when its Prefect run is cancelled.
"""

from __future__ import annotations

from enrichflow.local_prefect import on_a_shared_server
from enrichflow.provider import open_journaled_client
from enrichflow.storage import Location
from enrichflow.tasks.state import RunState
from enrichflow.tasks.submit import awaited_batches
from enrichflow.tasks.wait import TERMINAL


def cancel_run(location: Location, flow_run_id: str | None = None
               ) -> tuple[RunState | None, list[str]]:
    """(the run asked to stop, or None if there is none; the batches cancelled). With
    `flow_run_id`, only if the unfinished run is that Prefect flow run's: a cancel of a
    run that never journaled (or of an older one) leaves alone the run writing now."""
    state = RunState.load(location)
    if state is None or state.finished or flow_run_id not in (None, state.flow_run_id):
        return None, []
    state.request_cancel()
    cancelled = []
    with open_journaled_client(state.provider, location) as client:
        awaited = awaited_batches(client, state)
        batches = client.look([batch_id for _, batch_id in awaited]) if awaited else []
        for (name, _), batch in zip(awaited, batches, strict=True):
            if batch.status not in TERMINAL and batch.status != "cancelling" \
                    and client.cancel(batch.id):  # not finished between the look and now
                cancelled.append(f"batch {batch.id} ({name})")
    if on_a_shared_server():  # their tokens go back to the organisation's queue at once
        from enrichflow.tasks.ledger import release_leases

        release_leases(state.awaited())
    return state, cancelled
