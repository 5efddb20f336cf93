"""The rerun-crashed flow: run a crashed enrich run again, from its deployment, with the
same parameters.

A run whose process or machine was lost ends Crashed: its worker says so, or, when the
worker was lost too, the zombie automation of `automations.yaml` once the run's heartbeats
stop. Its batches run on at the provider, unwatched. Running the job again is safe (it
re-attaches to them and pays nothing twice), so the rerun-crashed deployment runs this
flow on every enrich run's Crashed event. A run that crashed MAX_RERUNS times in a row
is left to a person.

    python -m enrichflow.flows.recover FLOW_RUN_ID      # by hand
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.logging.loggers import flow_run_logger

from enrichflow.tasks.events import flow_run_of

MAX_RERUNS = 3
RERUN_OF = "enrichflow-rerun-of:"  # tag of a rerun: the first run that crashed
RERUN = "enrichflow-rerun:"  # tag of a rerun: its number


@flow(name="rerun-crashed", log_prints=True)
def rerun_crashed(flow_run: str) -> str | None:
    """Run a crashed enrich flow run again from its deployment; the new run's id, or
    None when it is not run again.

    Args:
        flow_run: The crashed run's id, or its event resource id (prefect.flow-run.ID).
    """
    log = get_run_logger()
    crashed = flow_run_of(flow_run)
    told = flow_run_logger(crashed)
    if crashed.deployment_id is None:
        log.info("%s was not started from a deployment; run its job again by hand",
                 crashed.name)
        return None
    origin = _tagged(crashed.tags, RERUN_OF) or str(crashed.id)
    reruns = int(_tagged(crashed.tags, RERUN) or 0)
    if reruns >= MAX_RERUNS:
        told.error("crashed again after %d reruns; not run again: look at its logs, then "
                   "run the job again (it re-attaches to its batches)", reruns)
        return None
    tags = [t for t in crashed.tags if not t.startswith((RERUN_OF, RERUN))]
    again = run_deployment(crashed.deployment_id, parameters=crashed.parameters, timeout=0,
                           as_subflow=False,
                           tags=[*tags, f"{RERUN_OF}{origin}", f"{RERUN}{reruns + 1}"])
    told.warning("crashed: run again as %s (%s), rerun %d of at most %d; it re-attaches to "
                 "its batches and pays nothing twice", again.name, again.id, reruns + 1,
                 MAX_RERUNS)
    return str(again.id)


def _tagged(tags: list[str], prefix: str) -> str | None:
    return next((tag.removeprefix(prefix) for tag in tags if tag.startswith(prefix)), None)


if __name__ == "__main__":
    rerun_crashed(sys.argv[1])
