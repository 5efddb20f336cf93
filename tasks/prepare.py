"""Steps 1 to 3 as one pass: everything known before the first upload.

Stream the dataset, render each batch of rows, set aside the requests answered by earlier
runs, count the tokens and bytes of the rest, plan the first shards and price the job.
What is kept is a few numbers per row (which rows to send, their tokens and bytes), never
the rows or their lines: each shard renders its own lines again when it is sent. The
scan is cut into pieces of whole files where the files' row counts are known, each a
task on the job's runner (`tasks.runner`); `enrichflow estimate` scans them in turn,
without Prefect.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import JobConfig
from enrichflow.errors import CostLimitError
from enrichflow.provider import provider_kind
from enrichflow.storage import Location
from tasks import as_task
from tasks.answers import check_answer_columns
from tasks.budget import TokenBudget
from tasks.cache import AnswerCache, request_hashes
from tasks.estimate import Estimate, Price, default_token_budget, price_for, request_tokens, usd
from tasks.load import KEY, ROW, Source, TypesWidened, check_unique_keys
from tasks.plan import BYTES, TOKENS, Shard, check_rows_fit, line_bytes, plan_shards
from tasks.render import render_requests
from tasks.runner import Calls, in_turn
from tasks.state import RunState

UNSENT = pa.schema([(ROW, pa.int64()), (KEY, pa.string()), ("_status", pa.string()),
                    ("_error", pa.string())])
TO_SEND = pa.schema([(ROW, pa.int64()), (TOKENS, pa.int64()), (BYTES, pa.int64())])
PIECE_ROWS = 100_000  # rows a scan task reads, at least (whole files)


@dataclass(frozen=True)
class Scanned:
    """What the scan of rows [start, stop) found: a few numbers per row."""

    keys: pa.Array
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
    estimate: Estimate

    @property
    def tag(self) -> str:
        return self.job_key[:8]


def prepare_job(job: JobConfig, use_cache: bool = True, force: bool = False,
                calls: Calls = in_turn) -> Prepared:
    """Everything known before the first upload; `calls` runs the scan's pieces."""
    source = Source.open(job.dataset, job.storage_options)
    fingerprint = source.fingerprint()
    job_key = hashlib.sha256(f"{job.config_hash()}:{fingerprint}".encode()).hexdigest()[:24]
    cache = None
    if use_cache and job.cache.enabled:
        output = Location(job.output, job.storage_options)
        cache = AnswerCache.open(job.cache.uri, output, job.storage_options,
                                 [] if force else unfinished_batches(output, job_key))
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
    check_unique_keys(pa.chunked_array([p.keys for p in pieces], pa.string()), job.dataset)
    rows = sum(len(p.keys) for p in pieces)
    reused = sum(p.reused for p in pieces)
    to_send = pa.concat_tables([p.to_send for p in pieces]).combine_chunks()
    unsent = pa.concat_tables([p.unsent for p in pieces]).combine_chunks()
    shards = plan_shards(to_send, job.limits.max_requests_per_shard,
                         job.limits.max_bytes_per_shard, plan_limit)
    ceiling = job.request.output_ceiling()
    price = price_for(job.request.model, job.price)
    estimate = Estimate(
        model=job.request.model, rows=rows, not_sent=unsent.num_rows, reused=reused,
        requests=to_send.num_rows, shards=len(shards),
        input_tokens=int(pc.sum(to_send[TOKENS]).as_py() or 0),
        output_ceiling=None if ceiling is None else ceiling * to_send.num_rows, price=price)
    return Prepared(source, fingerprint, job_key, rows, to_send, unsent, reused, cache, shards,
                    budget, price, estimate)


def scan_rows(job: JobConfig, source: Source, tag: str, cache: AnswerCache | None,
              plan_limit: int | None, start: int = 0, stop: int | None = None) -> Scanned:
    """One pass over rows [start, stop): their keys, their requests to send (tokens and
    bytes), the rows not sent, how many were answered before."""
    keys, to_send, unsent, reused = [], [], [], 0
    for batch in source.batches(start, stop):
        table = pa.Table.from_batches([batch])
        if not keys and start == 0:
            check_answer_columns(table, job.request)
        keys.append(batch.column(KEY))
        rendered = render_requests(table, job.request, tag, job.dataset.path,
                                   job.storage_options)
        requests = rendered.requests
        if cache is not None:
            known = cache.reused(request_hashes(requests))
            reused += pc.sum(known).as_py() or 0
            requests = requests.filter(pc.invert(known))
        requests = requests.append_column(
            TOKENS, pa.array(request_tokens(requests, job.request, job.dataset.path),
                             pa.int64())
        ).append_column(BYTES, line_bytes(requests))
        check_rows_fit(requests, job.limits.max_bytes_per_shard, plan_limit)
        to_send.append(requests.select(TO_SEND.names))
        unsent.append(rendered.unsent.cast(UNSENT))
    return Scanned(pa.chunked_array(keys, pa.string()).combine_chunks(),
                   pa.concat_tables(to_send) if to_send else TO_SEND.empty_table(),
                   pa.concat_tables(unsent) if unsent else UNSENT.empty_table(), reused)


def unfinished_batches(output: Location, job_key: str) -> list[str]:
    """The batches of this job's unfinished run, its synchronous canary's included. Their
    answers may be in the cache already (a run killed after it wrote the cache, before
    its output): they are that run's, to collect and count again as its own, not answers
    of an earlier run reused for free."""
    state = RunState.load(output)
    if state is None or state.finished or state.job_key != job_key:
        return []
    return [state.sync_canary_batch,
            *(record.batch_id for record in state.shards if record.batch_id)]


def check_cost_cap(estimate: Estimate, max_cost_usd: float | None) -> None:
    """Refuse, before anything is uploaded, a job that may cost more than its cap. The
    message is one line; the figures behind it are the estimate the run logged just
    before (and `enrichflow estimate` prints)."""
    if max_cost_usd is None or estimate.requests == 0:
        return
    span = estimate.batch_range()
    if span is None:
        raise CostLimitError(f"max_cost_usd is set but the price of {estimate.model} is "
                             "unknown; set `price` in the job file")
    if span[1] is None:
        raise CostLimitError("max_cost_usd is set but the output has no ceiling; set "
                             "request.max_tokens so the cost is bounded")
    if span[1] > max_cost_usd:
        raise CostLimitError(f"this job may cost up to {usd(span[1])} ({estimate.requests:,} "
                             f"requests), more than max_cost_usd {usd(max_cost_usd)}; nothing "
                             "was uploaded. Lower dataset.limit or max_tokens, or raise the "
                             "cap (enrichflow estimate shows the figures)")


scan_rows_task = as_task(scan_rows, "scan rows")
