"""What the person watching the Prefect UI sees: the run's artifacts.

Every run leaves an estimate (before), a progress bar (during), and a summary, a table of
the first enriched rows and where the output is (after): one of each per flow run, also
when a suspended run is resumed and runs its flow function again.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import quote
from uuid import UUID

import pyarrow as pa
from prefect import runtime
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from enrichflow.config import CanaryConfig, Job
from enrichflow.provider import answered_by, cost_text
from enrichflow.tasks import watch
from enrichflow.tasks.answers import answer_columns
from enrichflow.tasks.canary import CanaryOutcome
from enrichflow.tasks.estimate import Estimate, deadline_text, estimate_error_text
from enrichflow.tasks.load import KEY

TABLE_ROWS = 20
CELL_ITEMS = 8  # a longer list (an embedding) shows its first items
CELL_CHARS = 160


def artifact_key(job_name: str, what: str) -> str:
    """Prefect artifact keys take lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{job_name}-{what}".lower()).strip("-")


def _this_runs(key: str) -> UUID | None:
    """The id of the artifact `key` that this flow run made before it suspended, if any."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[runtime.flow_run.id]),
            key=ArtifactFilterKey(any_=[key])), limit=1)
    return found[0].id if found else None


def publish_estimate(job_name: str, estimate: Estimate) -> None:
    watch.estimated(estimate)
    if _this_runs(artifact_key(job_name, "estimate")):
        return
    create_markdown_artifact(f"# Estimate for {job_name}\n\n{estimate.markdown()}",
                             key=artifact_key(job_name, "estimate"),
                             description="Rows, tokens and cost, before sending")


def publish_canary(job_name: str, outcome: CanaryOutcome, canary: CanaryConfig) -> None:
    """The canary's verdict, with its failed sample rows and why."""
    verdict = "passed" if outcome.passed(canary) else "FAILED: the job was stopped before " \
                                                       "uploading its batches"
    rows = "".join(f"| {_markdown(key)} | {_markdown(error)} |\n" for key, error in zip(
        outcome.failed[KEY].to_pylist()[:TABLE_ROWS],
        outcome.failed["_error"].to_pylist()[:TABLE_ROWS], strict=True))
    failed = f"\n\n| row | error |\n| --- | --- |\n{rows}" if rows else ""
    create_markdown_artifact(f"# Canary for {job_name}: {verdict}\n\n{outcome.text(canary)}"
                             f"{failed}", key=artifact_key(job_name, "canary"),
                             description="A sample of rows answered and checked first")


def _markdown(text: str | None) -> str:
    """Text for a cell of a Markdown table: on one line, without column bars."""
    return _cell(text or "").replace("|", "\\|").replace("\n", " ")


def start_progress(job_name: str) -> UUID:
    """The run's progress artifact: made at its first start, found again after a resume."""
    key = artifact_key(job_name, "progress")
    return _this_runs(key) or create_progress_artifact(
        0.0, key=key, description="Requests finished in the current attempt")


def publish_results(manifest: dict[str, Any], first: pa.Table, job: Job) -> None:
    """The summary, the first rows and the output location of a finished run."""
    name = manifest["job"]
    started, finished = manifest["started_at"], manifest["finished_at"]
    rows = "\n".join(f"| {status} | {count:,} |"
                     for status, count in manifest["rows_by_status"].items())
    title = f"{name}: {manifest['rows']:,} rows enriched"
    error = manifest["estimate_error"]
    estimated = f"- estimate against the bill: {estimate_error_text(error)}\n" if error else ""
    if manifest["deadline"]:
        estimated += f"- deadline: {deadline_text(manifest['deadline'])}\n"
    stopped = (" (the job was cancelled)" if manifest["cancelled"] else
               " (stopped at max_cost_usd)" if manifest["cost_cap_reached"] else "")
    summary = f"""# {title}{stopped}

| status | rows |
| --- | --- |
{rows}

- reused from earlier runs (not paid again): {manifest['rows_reused']:,}
- attempts: {manifest['attempts']}, batches: {sum(1 for s in manifest['shards'] if s['batch_id'])}
- tokens: {manifest['tokens']['prompt']:,} prompt, {manifest['tokens']['completion']:,} completion
- cost at batch prices: {cost_text(manifest['cost_usd'], manifest['provider'])}
{estimated}- model: {manifest['model']}, answered by {answered_by(manifest['provider'])}
- from {started} to {finished}
- output: `{shown(manifest['output'])}`
"""
    create_markdown_artifact(summary, key=artifact_key(name, "summary"),
                             description="Rows by status, attempts, tokens, cost, duration")
    create_table_artifact(first_rows(first, job), key=artifact_key(name, "rows"),
                          description=f"The first {TABLE_ROWS} enriched rows")
    publish_output(name, manifest["output"], job.storage_options)


def publish_committed(ledgers: list[dict[str, str]]) -> None:
    """What every run on this Prefect server has in its providers' queues
    (`ledger.committed`), one artifact whose versions follow the takes and releases."""
    create_table_artifact(ledgers, key="enrichflow-enqueued-tokens",
                          description="Prompt tokens in unfinished batches and their cost at "
                                      "batch prices, per provider account and model, for "
                                      "every run on this Prefect server")


def first_rows(first: pa.Table, job: Job) -> list[dict[str, Any]]:
    """The output's first rows led by what a reader looks for: the key, the status and
    error, the cost (before a long answer pushes them off the screen), the answer; the
    input columns after them."""
    key = job.dataset.id_column or first.column_names[0]
    lead = [key, "_status", "_error", "_cost_usd", *answer_columns(job.request)]
    rest = [c for c in first.column_names if c not in lead and not c.startswith("_")]
    rows = first.select(lead + rest).slice(0, TABLE_ROWS).to_pylist()
    return [{k: _cell(v) for k, v in row.items()} for row in rows]


def publish_output(job_name: str, uri: str, storage_options: dict[str, Any]) -> None:
    """A link where a browser can open the output (the S3 console for AWS); the path as
    text where none can (local folders, which browsers refuse as file:// links from a
    web page, and S3-compatible stores)."""
    key, description = artifact_key(job_name, "output"), "Where the Parquet is"
    if uri.startswith("s3://") and not storage_options.get("endpoint_url"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        console = (f"https://s3.console.aws.amazon.com/s3/buckets/{quote(bucket)}"
                   f"?prefix={quote(prefix.rstrip('/') + '/')}")
        create_link_artifact(console, link_text=uri, key=key, description=description)
        return
    where = shown(uri)
    create_markdown_artifact(f"The output is in `{where}`\n\n```python\nimport pandas as pd\n"
                             f"pd.read_parquet({where!r})\n```\n", key=key,
                             description=description)


def shown(uri: str) -> str:
    """A location as the UI shows it: a local folder as an absolute path."""
    return uri if "://" in uri else os.path.abspath(uri)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)  # money: no float noise such as 0.000017024999999999997
    if isinstance(value, str) and len(value) > CELL_CHARS:
        return value[:CELL_CHARS] + "…"
    if isinstance(value, list) and len(value) > CELL_ITEMS:  # an embedding
        return [_cell(v) for v in value[:CELL_ITEMS]] + [f"… {len(value):,} in all"]
    return value
