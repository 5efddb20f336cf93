"""Writing a job's output part by part: every input row exactly once, in input order.

Each part is PART_ROWS input rows, read again from the dataset, merged with the journaled
results of its rows (and the answers reused from the cache), and written as its own
Parquet file, so memory holds a part, not the table. The run's new answers go into the
cache on the way; what the manifest and the artifacts need is summed up as parts go.
"""

from __future__ import annotations

from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import Job
from enrichflow.storage import Location
from enrichflow.tasks.cache import HASH, request_hashes
from enrichflow.tasks.load import ROW, RowReader
from enrichflow.tasks.merge import (
    MERGED,
    NOT_SENT,
    attempt_results_schema,
    merge_part_task,
    reused_results,
)
from enrichflow.tasks.prepare import Prepared
from enrichflow.tasks.render import render_requests
from enrichflow.tasks.report import TABLE_ROWS
from enrichflow.tasks.state import ATTEMPT, SENT_NOW, RunState, batch_id_starts
from enrichflow.tasks.write import PART_ROWS, write_part


@dataclass
class Written:
    """What the parts written hold, summed up."""

    parts: int = 0
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    sent_now: int = 0  # rows a deadline sent through the synchronous API
    cost_now_usd: float = 0.0  # what they cost (in `cost_usd` too)
    first_error: str | None = None  # of the first failed row
    first_rows: pa.Table | None = None  # the first TABLE_ROWS rows

    def add(self, part: pa.Table) -> None:
        self.parts += 1
        self.rows += part.num_rows
        self.by_status.update({s["values"]: s["counts"]
                               for s in pc.value_counts(part["_status"]).to_pylist()})
        self.prompt_tokens += pc.sum(part["_prompt_tokens"]).as_py() or 0
        self.completion_tokens += pc.sum(part["_completion_tokens"]).as_py() or 0
        self.cost_usd += pc.sum(part["_cost_usd"]).as_py() or 0.0
        now = batch_id_starts(part["_batch_id"], SENT_NOW)
        self.sent_now += pc.sum(now).as_py() or 0
        self.cost_now_usd += pc.sum(part["_cost_usd"].filter(now)).as_py() or 0.0
        if self.first_error is None:
            failed = part.filter(pc.equal(part["_status"], "failed"))
            self.first_error = failed["_error"][0].as_py() if failed.num_rows else None
        if self.first_rows is None:  # a copy: a slice would keep the whole part in memory
            self.first_rows = pa.Table.from_pylist(part.slice(0, TABLE_ROWS).to_pylist(),
                                                   schema=part.schema)


def write_parts(job: Job, location: Location, prepared: Prepared, state: RunState,
                not_sent: str = NOT_SENT) -> Written:
    """Merge and write every part; the new answers are kept in the cache. A row sent
    without a result was not sent after all: `not_sent` says why."""
    written = Written()
    schema = attempt_results_schema(job.request)
    # the answers' text is read only to keep new answers in the cache
    columns = schema.names if prepared.cache is not None else MERGED
    with closing(RowReader(prepared.source)) as reader:
        for index, start in enumerate(range(0, prepared.rows, PART_ROWS)):
            stop = min(start + PART_ROWS, prepared.rows)
            table = reader.read(start, stop)
            results = state.results_for(start, stop, columns)
            results = (schema.empty_table() if results is None else results).select(columns)
            unsent = prepared.unsent.filter(pc.and_(pc.greater_equal(prepared.unsent[ROW], start),
                                                    pc.less(prepared.unsent[ROW], stop)))
            if prepared.cache is not None:
                results = _with_cache(job, prepared, table, results, unsent).select(MERGED)
            part = merge_part_task(table, prepared.tag, results, unsent,
                                   job.request, prepared.price, not_sent)
            write_part(location, index, part)
            written.add(part)
    if prepared.cache is not None:
        prepared.cache.save()
    return written


def _with_cache(job: Job, prepared: Prepared, table: pa.Table, results: pa.Table,
                unsent: pa.Table) -> pa.Table:
    """The part's results with the answers reused from the cache added, after keeping
    its new answers in the cache. Both need the requests' hashes: the part is rendered
    again for them."""
    requests = render_requests(table, job.request, prepared.tag, job.dataset.path,
                               job.storage_options).requests
    hashes = pa.table({ROW: requests[ROW], HASH: request_hashes(requests)})
    answered = results.filter(pc.and_(results["_ok"], pc.greater(results[ATTEMPT], 0)))
    fresh = answered.select([ROW, "_answer", "_finish_reason", "_batch_id"])
    prepared.cache.add(fresh.join(hashes, keys=ROW, join_type="inner"))
    unanswered = pc.invert(pc.or_(pc.is_in(hashes[ROW], value_set=results[ROW]),
                                  pc.is_in(hashes[ROW], value_set=unsent[ROW])))
    wanted = hashes.filter(unanswered)
    if wanted.num_rows == 0:
        return results
    kept = prepared.cache.answers_for(wanted[HASH])
    found = pc.index_in(wanted[HASH], value_set=kept[HASH])
    wanted = wanted.filter(pc.is_valid(found))
    kept = kept.take(found.drop_null())
    reused = pa.table({ROW: wanted[ROW], "_answer": kept["_answer"],
                       "_finish_reason": kept["_finish_reason"],
                       "_batch_id": kept["_batch_id"]})
    return pa.concat_tables([results, reused_results(reused, job.request)])
