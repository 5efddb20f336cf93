"""Step 7a, merge: each input row of a part exactly once, with its answer as typed columns.

The results of all attempts of the part's rows are reduced in Arrow (the last attempt of
a row wins; tokens add up over attempts, since every answered attempt is billed), put in
the rows' order by row number, and the answer's struct becomes the answer columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import RequestConfig
from enrichflow.tasks import as_task
from enrichflow.tasks.answers import answer_type, read_answers
from enrichflow.tasks.collect import VALUE, results_schema
from enrichflow.tasks.estimate import Price
from enrichflow.tasks.load import KEY, ROW
from enrichflow.tasks.render import custom_ids
from enrichflow.tasks.state import ATTEMPT, SYNC_PRICED, batch_id_starts

NOT_SENT = "cancelled before it was sent"
# The results' columns a merge reads (not the answers' text, the largest)
MERGED = [ROW, "_batch_id", "_ok", "_error", "_prompt_tokens", "_completion_tokens", VALUE,
          ATTEMPT]


def attempt_results_schema(request: RequestConfig) -> pa.Schema:
    """Results as journaled: with the attempt that got them (0: reused from the cache)."""
    return results_schema(request).append(pa.field(ATTEMPT, pa.int64()))


def reused_results(reused: pa.Table, request: RequestConfig) -> pa.Table:
    """Answers kept from earlier runs (`_row`, `_answer`, `_finish_reason`, `_batch_id`)
    as results of attempt 0: answered, and not paid again."""
    values, _ = read_answers(reused["_answer"].combine_chunks(),
                             reused["_finish_reason"].combine_chunks(), request)
    count = reused.num_rows
    columns = {ROW: reused[ROW], "_batch_id": reused["_batch_id"],
               "_ok": pa.array([True] * count), "_retryable": pa.array([False] * count),
               "_answer": reused["_answer"], "_finish_reason": reused["_finish_reason"],
               "_prompt_tokens": pa.array([0] * count, pa.int64()),
               "_completion_tokens": pa.array([0] * count, pa.int64()),
               VALUE: values,
               ATTEMPT: pa.array([0] * count, pa.int64())}
    schema = attempt_results_schema(request)
    return pa.table({f.name: columns.get(f.name, pa.nulls(count, f.type)) for f in schema},
                    schema=schema)


def merge_part(table: pa.Table, job_tag: str, results: pa.Table, unsent: pa.Table,
               request: RequestConfig, price: Price | None = None,
               not_sent: str = NOT_SENT) -> pa.Table:
    """The part's rows (`table`, with `_key` and `_row`) with their `results` (all
    attempts and reused answers, `attempt_results_schema` or just its MERGED columns)
    and the rows render did not send (`unsent`: `_row`, `_status`, `_error`). A row sent
    without a result is one a cancel or the cost cap kept from being sent (`not_sent`
    says which). `_cost_usd` is at batch prices (a synchronous canary's rows at
    synchronous ones), null if unknown."""
    count, first = table.num_rows, (table[ROW][0].as_py() if table.num_rows else 0)
    ordered = results.sort_by([(ROW, "ascending"), (ATTEMPT, "ascending")])
    rows = ordered[ROW].to_numpy()
    last = np.flatnonzero(np.r_[rows[1:] != rows[:-1], True]) if len(rows) else rows
    starts = np.r_[0, last[:-1] + 1] if len(rows) else rows
    final = ordered.take(pa.array(last, pa.int64()))
    at_row = _placed(final[ROW], first, count)
    final = final.take(at_row)
    unsent = unsent.take(_placed(unsent[ROW], first, count))

    ok = pc.fill_null(final["_ok"], False)
    sent = pc.is_null(unsent["_status"])
    reused = pc.fill_null(pc.equal(final[ATTEMPT], 0), False)
    attempts = pa.array(last - starts + 1 if len(rows) else [], pa.int64()).take(at_row)
    prompt = _sums(ordered["_prompt_tokens"], starts).take(at_row)
    completion = _sums(ordered["_completion_tokens"], starts).take(at_row)
    if price is None:
        cost = pa.nulls(count, pa.float64())
    else:  # a synchronous canary's (and a deadline's) answers were paid at synchronous prices
        sync = batch_id_starts(final["_batch_id"], SYNC_PRICED)
        cost = pc.divide(pc.add(
            pc.multiply(pc.cast(prompt, pa.float64()),
                        pc.if_else(sync, price.input, price.batch_input)),
            pc.multiply(pc.cast(completion, pa.float64()),
                        pc.if_else(sync, price.output, price.batch_output))), 1e6)
    no_text = pa.scalar(None, pa.string())
    meta = {
        "_status": pc.if_else(ok, "ok", pc.coalesce(unsent["_status"], "failed")),
        "_error": pc.if_else(sent, pc.if_else(ok, no_text, pc.coalesce(final["_error"],
                                                                        not_sent)),
                             unsent["_error"]),
        "_attempts": pc.if_else(reused, 0, pc.fill_null(attempts, 0)),
        "_reused": reused,
        "_custom_id": pc.if_else(sent, custom_ids(table[KEY], job_tag), no_text),
        "_batch_id": final["_batch_id"],
        "_prompt_tokens": prompt,
        "_completion_tokens": completion,
        "_cost_usd": cost,
    }
    answers = final[VALUE].combine_chunks().flatten()
    output = table.drop_columns([KEY, ROW])
    for field, column in zip(answer_type(request), answers, strict=True):
        output = output.append_column(field.name, column)
    for name, column in meta.items():
        output = output.append_column(name, column)
    return output


def _placed(rows: pa.ChunkedArray, first: int, count: int) -> pa.Array:
    """Indices that put a table of distinct `rows` in the order of rows [first,
    first + count); null where a row has none."""
    where = np.full(count, -1, dtype=np.int64)
    where[rows.to_numpy() - first] = np.arange(len(rows))
    return pa.array(where, mask=where < 0)


def _sums(values: pa.ChunkedArray, starts: np.ndarray) -> pa.Array:
    """Sums of the groups that begin at `starts`; null for a group of nulls only."""
    if not len(starts):
        return pa.array([], pa.int64())
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    sums = np.add.reduceat(pc.fill_null(values, 0).to_numpy(), starts)
    return pa.array(sums, mask=np.add.reduceat(valid, starts) == 0)


merge_part_task = as_task(merge_part, "merge answers into rows")
