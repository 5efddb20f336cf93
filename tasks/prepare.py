"""Steps 1 to 3 as one unit: everything known before the first upload.

Load and render the rows, set aside the requests answered by earlier runs, count the
tokens of the rest, plan the first shards and price the job. The flow runs it as a
task; `enrichflow estimate` runs the very same function without Prefect.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import JobConfig
from enrichflow.errors import CostLimitError
from enrichflow.storage import Location
from tasks import as_task
from tasks.budget import TokenBudget
from tasks.cache import AnswerCache, request_hashes, split_reused
from tasks.collect import ATTEMPT_RESULTS
from tasks.estimate import (
    Estimate,
    Price,
    default_token_budget,
    price_for,
    request_tokens,
    usd,
)
from tasks.load import Rows, load_rows
from tasks.merge import check_answer_columns
from tasks.plan import TOKENS, Shard, plan_shards
from tasks.render import Rendered, render_requests
from tasks.state import RunState


@dataclass(frozen=True)
class Prepared:
    rows: Rows
    job_key: str  # config and data: the same key means the same job
    rendered: Rendered
    hashes: pa.Array  # request hash of each of rendered.requests
    reused: pa.Table  # results taken from the cache (`_attempt` 0)
    cache: AnswerCache | None  # None when the cache is off
    to_send: pa.Table  # requests still to send, with their `_tokens`
    shards: list[Shard]  # the first attempt's plan
    token_budget: int | None
    price: Price | None
    estimate: Estimate

    @property
    def tag(self) -> str:
        return self.job_key[:8]


def prepare_job(job: JobConfig, use_cache: bool = True, force: bool = False) -> Prepared:
    rows = load_rows(job.dataset, job.storage_options)
    check_answer_columns(rows.table, job.request.response_format)
    job_key = hashlib.sha256(f"{job.config_hash()}:{rows.fingerprint}".encode()).hexdigest()[:24]
    rendered = render_requests(rows.table, job.request, job_key[:8], job.dataset.path,
                               job.storage_options)
    hashes = request_hashes(rendered.requests)
    reused, to_send, cache = ATTEMPT_RESULTS.empty_table(), rendered.requests, None
    if use_cache and job.cache.enabled:
        output = Location(job.output, job.storage_options)
        cache = AnswerCache.open(job.cache.uri, output, job.storage_options)
        earlier = cache.answers.filter(pc.invert(pc.is_in(
            cache.answers["_batch_id"],
            value_set=pa.array([] if force else unfinished_batches(output, job_key),
                               pa.string()))))
        reused, to_send = split_reused(rendered.requests, hashes, earlier)
    to_send = to_send.append_column(TOKENS, pa.array(request_tokens(to_send), pa.int64()))
    budget = job.limits.enqueued_token_budget or default_token_budget(job.request.model)
    shards = plan_shards(to_send, job.limits.max_requests_per_shard,
                         job.limits.max_bytes_per_shard, TokenBudget(budget).plan_limit)
    ceiling = job.request.max_completion_tokens or job.request.max_tokens
    price = price_for(job.request.model, job.price)
    estimate = Estimate(
        model=job.request.model, rows=rows.table.num_rows, not_sent=rendered.unsent.num_rows,
        reused=reused.num_rows, requests=to_send.num_rows, shards=len(shards),
        input_tokens=int(pc.sum(to_send[TOKENS]).as_py() or 0),
        output_ceiling=None if ceiling is None else ceiling * to_send.num_rows, price=price)
    return Prepared(rows, job_key, rendered, hashes, reused, cache, to_send, shards, budget,
                    price, estimate)


def unfinished_batches(output: Location, job_key: str) -> list[str]:
    """The batches of this job's unfinished run. Their answers may be in the cache already
    (a run killed after it wrote the cache, before its output): they are that run's, to
    collect and count again as its own, not answers of an earlier run reused for free."""
    state = RunState.load(output)
    if state is None or state.finished or state.job_key != job_key:
        return []
    return [record.batch_id for record in state.shards if record.batch_id]


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


prepare_job_task = as_task(prepare_job, "prepare requests")
