"""The canary: a few rows sent before the job's batches, their answers checked exactly as
the collect step will check the batches', so that a broken prompt or schema stops the job
in seconds rather than a day later, after it was paid for.

The sample is the first `canary.rows` rows to send (at most half of them, so that a small
job still goes through the Batch API), answered through the synchronous API
(at synchronous prices: a few cents) or, with `canary.mode: batch`, as one small batch.
A canary that passes is journaled as part of the run's first attempt, so its rows are
not sent again: their answers are the run's. A canary batch carries the run's metadata: a
run killed while it waits finds it again rather than paying for another. Its files are
deleted only once its answers are journaled (`delete_canary_files`), as a shard's are.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from openai.types import Batch
from prefect import get_run_logger

from enrichflow.config import CanaryConfig, Job
from enrichflow.provider import open_client
from enrichflow.providers import BatchAPI, Intent
from enrichflow.storage import Location
from enrichflow.tasks import as_task
from enrichflow.tasks.answer_now import answer_now
from enrichflow.tasks.collect import collect_results
from enrichflow.tasks.load import KEY, ROW, RowReader
from enrichflow.tasks.plan import jsonl
from enrichflow.tasks.prepare import Prepared
from enrichflow.tasks.render import CUSTOM_ID, render_requests
from enrichflow.tasks.submit import create_batch
from enrichflow.tasks.wait import TERMINAL, wait_for_batches

REPLACED = frozenset({"failed", "expired"})  # a canary batch that another one replaces


@dataclass(frozen=True)
class CanaryOutcome:
    rows: int
    failed: pa.Table  # `_key` and `_error` of the sample rows without a usable answer
    results: pa.Table | None  # as collect makes them (`results_schema`); None: no sample,
    # or its batch still runs
    batch_id: str | None  # mode batch: the canary's batch
    cost_usd: float | None
    seconds: float
    batch: Batch | None = None  # mode batch: its batch, cleaned up once journaled

    @classmethod
    def nothing(cls) -> CanaryOutcome:
        """The outcome when no row is left to send."""
        failed = pa.table({KEY: pa.array([], pa.string()), "_error": pa.array([], pa.string())})
        return cls(0, failed, None, None, 0.0, 0.0)

    @property
    def waiting(self) -> bool:
        """Its batch still runs (a run that suspends rather than wait)."""
        return self.results is None and self.batch_id is not None

    @property
    def failure_rate(self) -> float:
        return self.failed.num_rows / self.rows if self.rows else 0.0

    def passed(self, canary: CanaryConfig) -> bool:
        return self.failure_rate <= canary.max_failure_rate

    def summary(self, canary: CanaryConfig) -> dict:
        """The outcome as plain values (the flow's result with --canary-only)."""
        return {"mode": canary.mode, "rows": self.rows, "failed": self.failed.num_rows,
                "failure_rate": self.failure_rate, "passed": self.passed(canary),
                "cost_usd": self.cost_usd, "seconds": round(self.seconds, 2),
                "errors": [f"row {key!r}: {error}" for key, error in zip(
                    self.failed[KEY].to_pylist(), self.failed["_error"].to_pylist(),
                    strict=True)]}

    def text(self, canary: CanaryConfig) -> str:
        cost = "unknown" if self.cost_usd is None else f"${self.cost_usd:,.4f}"
        return (f"canary ({canary.mode}): {self.rows - self.failed.num_rows} of {self.rows} "
                f"sample rows answered usably, {self.failed.num_rows} failed "
                f"({self.failure_rate:.0%}; at most {canary.max_failure_rate:.0%} passes) in "
                f"{self.seconds:.1f} s; cost {cost}")


def run_canary(client: BatchAPI, job: Job, prepared: Prepared, canary: CanaryConfig,
               intent: Intent, sync_batch_id: str, wait: bool = True) -> CanaryOutcome:
    """Send the sample and check its answers as collect does. Synchronous answers carry
    `sync_batch_id` as their batch. A canary batch carries the metadata of `intent`; one
    found by it (and usable: see `_usable`) is used instead of a new one.
    Without `wait`, a canary batch still running is left to run: the outcome is
    `waiting`."""
    started = time.monotonic()
    sample = canary.sample_size(prepared.to_send.num_rows)
    rows = prepared.to_send[ROW].slice(0, sample).combine_chunks()
    with closing(RowReader(prepared.source)) as reader:
        requests = render_requests(reader.take(rows), job.request, prepared.tag,
                                   job.dataset.path, job.storage_options).requests
    if canary.mode == "sync":
        results, batch = answer_now(client, requests, job.request, sync_batch_id), None
    else:
        results, batch = _answer_in_a_batch(client, requests, job, intent, wait)
        if results is None:
            return CanaryOutcome(len(rows), CanaryOutcome.nothing().failed, None, batch.id,
                                 None, time.monotonic() - started)
    price = prepared.price
    cost = None
    if price is not None:
        tokens = [pc.sum(results[c]).as_py() or 0 for c in ("_prompt_tokens",
                                                             "_completion_tokens")]
        cost = (price.sync_cost if canary.mode == "sync" else price.batch_cost)(*tokens)
    failed = pa.table({KEY: requests[KEY], "_error": results["_error"]}).filter(
        pc.invert(pc.fill_null(results["_ok"], False)))
    return CanaryOutcome(rows=results.num_rows, failed=failed, results=results,
                         batch_id=batch and batch.id, cost_usd=cost,
                         seconds=time.monotonic() - started, batch=batch)


def _answer_in_a_batch(client: BatchAPI, requests: pa.Table, job: Job, intent: Intent,
                       wait: bool) -> tuple[pa.Table | None, Batch]:
    """The requests as one small batch, uploaded, created (never twice), waited for (or,
    without `wait`, left running: no results) and collected as a shard's are; (the
    results, the batch). Its files are left for `delete_canary_files`."""
    limits = job.limits
    batch = client.find(intent)
    if batch is not None and _usable(client, batch):
        get_run_logger().info("canary: batch %s of this run exists already (the run stopped "
                              "after creating it); using it rather than paying for another "
                              "(--force starts a new run)", batch.id)
    else:
        upload_id = client.upload(f"{job.name}-canary.jsonl", jsonl(requests),
                                  orphans_since=intent.since)
        batch = create_batch(client, upload_id, job.request.endpoint, intent)
    if not wait and batch.status not in TERMINAL:
        return None, batch
    while batch.status not in TERMINAL:
        (batch,) = wait_for_batches(client, [batch.id], limits.poll_interval_min,
                                    limits.poll_interval_max, limits.max_wait_hours)
    return collect_results(client, batch, requests[ROW].combine_chunks(),
                           requests[CUSTOM_ID].combine_chunks(), job.request), batch


def _usable(client: BatchAPI, batch: Batch) -> bool:
    """Whether a canary batch found again can be used: not failed or expired, and its
    answers not deleted (an older enrichflow deleted them before journaling them)."""
    if batch.status in REPLACED:
        return False
    if not client.results_kept(batch):
        get_run_logger().warning("canary: the answers of batch %s of this run are gone; a "
                                 "new canary batch replaces it", batch.id)
        return False
    return True


def delete_canary_files(job: Job, location: Location, outcome: CanaryOutcome) -> None:
    """Delete a canary batch's files, once its answers are journaled (or it failed): a
    run killed before finds them still there."""
    if job.cleanup and outcome.batch is not None:
        with open_client(job.provider, location) as client:
            client.clean_up(outcome.batch)


run_canary_task = as_task(run_canary, "canary")
