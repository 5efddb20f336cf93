"""Pay only for what changed: answers are kept by the hash of the request that got them.

A request is identified by its body (model, messages, parameters), never by its row or
`custom_id`, so a re-run over a grown table sends only the new rows, and a changed prompt
or model sends everything again. Kept answers live in one Parquet file, by default
`<output>/_cache/answers.parquet`, or at `cache.uri` to share it between outputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.storage import Location
from tasks.collect import ATTEMPT_RESULTS
from tasks.render import CUSTOM_ID, LINE

HASH = "_request_hash"
DEFAULT_FILE = "_cache/answers.parquet"
CACHED = pa.schema([(HASH, pa.string()), ("_answer", pa.string()),
                    ("_finish_reason", pa.string()), ("_batch_id", pa.string())])


def request_hashes(requests: pa.Table) -> pa.Array:
    """sha256 of each line's body: everything after its `custom_id` field."""
    hashes = []
    for line in requests[LINE].to_pylist():
        body = line[line.index('"method"'):]
        hashes.append(hashlib.sha256(body.encode()).hexdigest())
    return pa.array(hashes, pa.string())


@dataclass(frozen=True)
class AnswerCache:
    """Where the kept answers live, and what they were when the run started."""

    location: Location
    name: str
    answers: pa.Table

    @classmethod
    def open(cls, uri: str | None, output: Location,
             storage_options: dict | None) -> AnswerCache:
        if uri is None:
            location, name = output, DEFAULT_FILE
        else:
            parent, _, name = uri.rstrip("/").rpartition("/")
            location = Location(parent, storage_options)
        return cls(location, name, _read(location, name))


def _read(location: Location, name: str) -> pa.Table:
    if not location.exists(name):
        return CACHED.empty_table()
    return location.read_parquet(name).select(CACHED.names).cast(CACHED)


def split_reused(requests: pa.Table, hashes: pa.Array,
                 answers: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(results for the requests answered before, the requests still to send)."""
    known = pc.is_in(hashes, value_set=answers[HASH])
    to_send = requests.filter(pc.invert(known))
    reused = pa.table({CUSTOM_ID: requests[CUSTOM_ID], HASH: hashes}).filter(known)
    reused = reused.join(answers, keys=HASH, join_type="inner")
    count = reused.num_rows
    results = pa.table({
        "_custom_id": reused[CUSTOM_ID], "_batch_id": reused["_batch_id"],
        "_ok": pa.array([True] * count), "_error": pa.nulls(count, pa.string()),
        "_retryable": pa.array([False] * count), "_answer": reused["_answer"],
        "_finish_reason": reused["_finish_reason"],
        "_prompt_tokens": pa.array([0] * count, pa.int64()),  # paid for by an earlier run
        "_completion_tokens": pa.array([0] * count, pa.int64()),
        "_attempt": pa.array([0] * count, pa.int64()),
    }, schema=ATTEMPT_RESULTS)
    return results, to_send


def remember_answers(cache: AnswerCache, requests: pa.Table, hashes: pa.Array,
                     results: pa.Table) -> None:
    """Add this run's good answers to the cache."""
    ok = results.filter(pc.and_(results["_ok"], pc.greater(results["_attempt"], 0)))
    by_id = pa.table({CUSTOM_ID: requests[CUSTOM_ID], HASH: hashes})
    fresh = ok.join(by_id, keys="_custom_id", right_keys=CUSTOM_ID, join_type="inner")
    fresh = fresh.select(CACHED.names).cast(CACHED)
    kept = _read(cache.location, cache.name)  # as it is now: other outputs may share it
    merged = pa.concat_tables([kept.filter(pc.invert(pc.is_in(kept[HASH],
                                                              value_set=fresh[HASH]))), fresh])
    cache.location.write_parquet(cache.name, merged)
