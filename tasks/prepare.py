"""Steps 1 to 3 as one pass: everything known before the first upload.

Stream the dataset, render each batch of rows, set aside the requests answered by earlier
runs, count the tokens and bytes of the rest, plan the first shards and price the job.
What is kept is a few numbers per row (which rows to send, their tokens and bytes), never
the rows or their lines: each shard renders its own lines again when it is sent. The
scan is cut into pieces of whole files where the files' row counts are known, each a
task on the job's runner (`enrichflow.tasks.runner`); `enrichflow estimate` scans them in turn,
without Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import Job
from enrichflow.local_prefect import on_a_shared_server
from enrichflow.provider import provider_kind
from enrichflow.storage import Location
from enrichflow.tasks import as_task
from enrichflow.tasks.answers import check_answer_columns
from enrichflow.tasks.budget import TokenBudget
from enrichflow.tasks.cache import AnswerCache, request_hashes
from enrichflow.tasks.estimate import (
    Estimate,
    Price,
    default_token_budget,
    price_for,
    request_tokens,
)
from enrichflow.tasks.load import (
    KEY,
    ROW,
    Source,
    TypesWidened,
    check_unique_keys,
    key_hashes,
)
from enrichflow.tasks.plan import BYTES, TOKENS, Shard, check_rows_fit, line_bytes, plan_shards
from enrichflow.tasks.render import render_requests
from enrichflow.tasks.runner import Calls, in_turn
from enrichflow.tasks.state import RunState

UNSENT = pa.schema([(ROW, pa.int64()), (KEY, pa.string()), ("_status", pa.string()),
                    ("_error", pa.string())])
# what prepare keeps of each request to send for the whole run: 16 bytes a row (a request
# takes far fewer than 2**31 tokens and bytes)
TO_SEND = pa.schema([(ROW, pa.int64()), (TOKENS, pa.int32()), (BYTES, pa.int32())])
PIECE_ROWS = 100_000  # rows a scan task reads, at least (whole files)


@dataclass(frozen=True)
class Scanned:
    """What the scan of rows [start, stop) found: a few numbers per row."""

    rows: int
    key_hashes: pa.Array  # of the rows' ids (`key_hashes`), for the uniqueness check
    to_send: pa.Table  # TO_SEND
    unsent: pa.Table  # UNSENT
    reused: int


@dataclass(frozen=True)
class Prepared:
    source: Source
    fingerprint: str  # of the dataset's bytes
    job_key: str  # config and data: the same key means the same job
    rows: int
    to_send: pa.Table  # TO_SEND: the requests still to send, in row order
    unsent: pa.Table  # UNSENT: rows not sent (skipped, or their input is unusable)
    reused: int  # rows whose request was answered before (not paid again)
    cache: AnswerCache | None  # None when the cache is off
    shards: list[Shard]  # the first attempt's plan
    token_budget: int | None
    price: Price | None
    estimate: Estimate  # of the whole job
    unfinished: RunState | None  # this job's run that did not end, as journaled before
    # the lease: the run that this one resumes
    canary_passed: dict | None  # the canary this job's request passed before, when it
    # need not be checked again (`canary_passed_before`)

    @property
    def tag(self) -> str:
        return self.job_key[:8]

    def estimate_left(self) -> Estimate:
        """The estimate of the requests the resumed run has not sent: those of the first
        attempt's shards it has no batch for (a shard split after a refusal counts as
        sent), less its canary's; the whole job's otherwise."""
        if self.unfinished is None or not self.estimate.requests:
            return self.estimate
        sent = {r.shard if r.parent is None else r.parent for r in self.unfinished.shards
                if r.attempt == 1 and r.batch_id and not r.canary}
        left = [shard for shard in self.shards if shard.index not in sent]
        unsent = np.zeros(self.to_send.num_rows, dtype=bool)
        for shard in left:
            unsent[shard.start:shard.end] = True
        canary = self.unfinished.canary_rows()
        if len(canary):
            unsent &= ~pc.is_in(self.to_send[ROW], value_set=canary).to_numpy(
                zero_copy_only=False)
        requests = int(unsent.sum())
        ceiling = self.estimate.output_ceiling
        return replace(self.estimate, requests=requests, shards=len(left),
                       already_sent=self.estimate.requests - requests,
                       input_tokens=int(self.to_send[TOKENS].to_numpy()[unsent].sum()),
                       output_ceiling=None if ceiling is None else
                       ceiling * requests // self.estimate.requests)


def prepare_job(job: Job, use_cache: bool = True, force: bool = False,
                calls: Calls = in_turn) -> Prepared:
    """Everything known before the first upload; `calls` runs the scan's pieces."""
    source = Source.open(job.dataset, job.storage_options)
    fingerprint = source.fingerprint()
    job_key = job.key(fingerprint)
    output = Location(job.output, job.storage_options)
    saved = RunState.load(output)
    unfinished = saved if saved and not saved.finished and saved.job_key == job_key else None
    cache = None
    if use_cache and job.cache.enabled:
        cache = AnswerCache.open(job.cache.uri, output, job.storage_options,
                                 [] if force or not unfinished else unfinished_batches(unfinished))
    budget = job.limits.enqueued_token_budget or (
        default_token_budget(job.request.model) if provider_kind(job.provider) == "openai"
        else None)
    plan_limit = TokenBudget(budget).plan_limit
    while True:
        try:
            pieces = calls(scan_rows_task, [
                {"job": job, "source": source, "tag": job_key[:8], "cache": cache,
                 "plan_limit": plan_limit, "start": start, "stop": stop}
                for start, stop in source.pieces(PIECE_ROWS)])
            break
        except TypesWidened as exc:  # the column is text from now on: rows are scanned alike
            if str(exc) not in source.text_columns:  # widened in another process
                source.text_columns.append(str(exc))
    check_unique_keys(pa.chunked_array([p.key_hashes for p in pieces], pa.uint64()), source)
    rows = sum(p.rows for p in pieces)
    reused = sum(p.reused for p in pieces)
    # the pieces' own chunks, not a copy: the requests to send are the largest thing held
    # for the whole run (16 bytes a request), and a copy of them would be held beside
    # the pieces until prepare returns
    to_send = pa.concat_tables([p.to_send for p in pieces])
    unsent = pa.concat_tables([p.unsent for p in pieces]).combine_chunks()
    shards = plan_shards(to_send, job.limits.max_requests_per_shard,
                         job.limits.max_bytes_per_shard, plan_limit)
    ceiling = job.request.output_ceiling()
    price = price_for(job.request.model, job.price)
    passed = canary_passed_before(job, cache)
    sync_canary = 0  # requests the canary will answer at synchronous prices
    if job.canary and job.canary.mode == "sync" and unfinished is None and not passed:
        sync_canary = job.canary.sample_size(to_send.num_rows)
    estimate = Estimate(
        model=job.request.model, rows=rows, not_sent=unsent.num_rows, reused=reused,
        requests=to_send.num_rows, shards=len(shards),
        input_tokens=int(pc.sum(to_send[TOKENS]).as_py() or 0),
        output_ceiling=None if ceiling is None else ceiling * to_send.num_rows, price=price,
        measured_output=unfinished and unfinished.canary_output(), sync_canary=sync_canary,
        token_limit=budget, deadline=job.deadline,
        deadline_lead=job.limits.deadline_lead_seconds, **queue_forecast(job, budget))
    return Prepared(source, fingerprint, job_key, rows, to_send, unsent, reused, cache, shards,
                    budget, price, estimate, unfinished, passed)


def queue_forecast(job: Job, budget: int | None) -> dict[str, Any]:
    """What the organisation's ledger knows for the estimate's forecast: the queue now
    and the batches' turnaround (on a shared Prefect server; nothing otherwise)."""
    if budget is None or not on_a_shared_server():
        return {}
    from enrichflow.tasks import ledger

    name = ledger.ledger_of(job.provider, job.request.model)
    return {"queue": ledger.queue_now(name, budget), "turnaround": ledger.turnaround(name)}


def scan_rows(job: Job, source: Source, tag: str, cache: AnswerCache | None,
              plan_limit: int | None, start: int = 0, stop: int | None = None) -> Scanned:
    """One pass over rows [start, stop): their ids' hashes, their requests to send (tokens
    and bytes), the rows not sent, how many were answered before."""
    rows, hashes, to_send, unsent, reused = 0, [], [], [], 0
    for batch in source.batches(start, stop):
        table = pa.Table.from_batches([batch])
        if not rows and start == 0:
            check_answer_columns(table, job.request)
        rows += batch.num_rows
        if job.dataset.id_column:  # row numbers are unique as they are
            hashes.append(key_hashes(batch.column(KEY)))
        rendered = render_requests(table, job.request, tag, job.dataset.path,
                                   job.storage_options)
        requests = rendered.requests
        if cache is not None:
            known = cache.reused(request_hashes(requests))
            reused += pc.sum(known).as_py() or 0
            requests = requests.filter(pc.invert(known))
        requests = requests.append_column(
            TOKENS, pa.array(request_tokens(requests, job.request, job.dataset.path),
                             pa.int32())
        ).append_column(BYTES, line_bytes(requests))
        check_rows_fit(requests, job.limits.max_bytes_per_shard, plan_limit)
        to_send.append(requests.select(TO_SEND.names))
        unsent.append(rendered.unsent.cast(UNSENT))
    return Scanned(rows, pa.chunked_array(hashes, pa.uint64()).combine_chunks(),
                   pa.concat_tables(to_send).combine_chunks() if to_send
                   else TO_SEND.empty_table(),
                   pa.concat_tables(unsent) if unsent else UNSENT.empty_table(), reused)


def canary_passed_before(job: Job, cache: AnswerCache | None) -> dict | None:
    """The canary that this job's request passed before, by the same answer cache, when
    it need not be checked again (`canary.again`); None otherwise."""
    if cache is None or job.canary is None or job.canary.again == "always":
        return None
    return cache.canary_passed(job.request_hash())


def unfinished_batches(state: RunState) -> list[str]:
    """The batches of this job's unfinished run, its synchronous canary's included. Their
    answers may be in the cache already (a run killed after it wrote the cache, before
    its output): they are that run's, to collect and count again as its own, not answers
    of an earlier run reused for free."""
    return [state.sync_canary_batch,
            *(record.batch_id for record in state.shards if record.batch_id)]


scan_rows_task = as_task(scan_rows, "scan rows")
