"""What fails most first runs, checked before Prefect starts: seconds, not the ten a run
takes to reach the same error, and said once. The dataset can be read and its first
rows fit the templates and the schema; the provider answers, with the key, and has the
model. The run checks all of it again on every row (and a deployment's run only there)."""

from __future__ import annotations

import pyarrow as pa

from enrichflow.config import Job
from enrichflow.provider import open_client
from enrichflow.storage import Location
from enrichflow.tasks.answers import check_answer_columns
from enrichflow.tasks.load import Source
from enrichflow.tasks.render import LINE, render_requests

FIRST_ROWS = 100


def preflight(job: Job) -> None:
    """Raise the error a run of `job` would meet first (InputError, ConfigError, an
    a provider SDK's APIError), before anything is sent."""
    rows = first_rows(job, FIRST_ROWS)
    if rows is not None:
        check_answer_columns(rows, job.request)
        render_requests(rows, job.request, "preflight", job.dataset.path,
                        job.storage_options)
    output = Location(job.output, job.storage_options)
    with open_client(job.provider, output, share_running=True) as client:  # a running
        # job's embedded server answers too
        client.check_model(job.request.model)


def preview_lines(job: Job, rows: int) -> list[str]:
    """The JSONL request lines of the first `rows` rows, as a run would upload them
    (their `custom_id` says `preview`); nothing is sent. Skipped rows have none."""
    table = first_rows(job, rows)
    if table is None:
        return []
    rendered = render_requests(table, job.request, "preview", job.dataset.path,
                               job.storage_options)
    return rendered.requests[LINE].to_pylist()


def first_rows(job: Job, count: int) -> pa.Table | None:
    """The dataset's first `count` rows, read without reading the rest; None if empty."""
    first = next(Source.open(job.dataset, job.storage_options).batches(0, count), None)
    return None if first is None else pa.Table.from_batches([first]).slice(0, count)
