"""What the person watching the Prefect UI sees: the run's artifacts.

Every run leaves an estimate (before), a progress bar (during), and a summary, a table of
the first enriched rows and a link to the output (after).
"""

from __future__ import annotations

import os
import re
from typing import Any
from uuid import UUID

import pyarrow as pa
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)

from tasks.estimate import Estimate

TABLE_ROWS = 20
CELL_CHARS = 160


def artifact_key(job_name: str, what: str) -> str:
    """Prefect artifact keys take lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{job_name}-{what}".lower()).strip("-")


def publish_estimate(job_name: str, estimate: Estimate) -> None:
    create_markdown_artifact(f"# Estimate for {job_name}\n\n{estimate.markdown()}",
                             key=artifact_key(job_name, "estimate"),
                             description="Rows, tokens and cost, before sending")


def start_progress(job_name: str) -> UUID:
    return create_progress_artifact(0.0, key=artifact_key(job_name, "progress"),
                                    description="Requests finished in the current attempt")


def publish_results(manifest: dict[str, Any], merged: pa.Table) -> None:
    """The summary, the first rows and the output link of a finished run."""
    job = manifest["job"]
    started, finished = manifest["started_at"], manifest["finished_at"]
    cost = manifest["cost_usd"]
    rows = "\n".join(f"| {status} | {count:,} |"
                     for status, count in manifest["rows_by_status"].items())
    summary = f"""# {job}: {manifest['rows']:,} rows enriched

| status | rows |
| --- | --- |
{rows}

- reused from earlier runs (not paid again): {manifest['rows_reused']:,}
- attempts: {manifest['attempts']}, batches: {sum(1 for s in manifest['shards'] if s['batch_id'])}
- tokens: {manifest['tokens']['prompt']:,} prompt, {manifest['tokens']['completion']:,} completion
- cost at batch prices: {'unknown (no price for ' + manifest['model'] + ')' if cost is None
                          else f'${cost:,.4f}'}
- model: {manifest['model']}, provider: {manifest['provider']['kind']}
- from {started} to {finished}
- output: `{manifest['output']}`
"""
    create_markdown_artifact(summary, key=artifact_key(job, "summary"),
                             description="Rows by status, attempts, tokens, cost, duration")
    shown = [c for c in merged.column_names
             if c not in ("_custom_id", "_batch_id", "_prompt_tokens", "_completion_tokens")]
    first = merged.select(shown).slice(0, TABLE_ROWS).to_pylist()
    create_table_artifact([{k: _cell(v) for k, v in row.items()} for row in first],
                          key=artifact_key(job, "rows"),
                          description=f"The first {TABLE_ROWS} enriched rows")
    create_link_artifact(_link(manifest["output"]), link_text=manifest["output"],
                         key=artifact_key(job, "output"), description="Where the Parquet is")


def _cell(value: Any) -> Any:
    text = value if isinstance(value, str) else None
    if text is not None and len(text) > CELL_CHARS:
        return text[:CELL_CHARS] + "…"
    return value


def _link(uri: str) -> str:
    return uri if "://" in uri else "file://" + os.path.abspath(uri)
