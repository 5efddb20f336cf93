"""Step 2, plan: split the requests to send into shards within the provider's limits.

A shard is one batch input file: at most `max_requests` lines, `max_bytes` bytes
(each line's real UTF-8 bytes and its newline) and, under an enqueued-token budget,
`max_tokens` estimated prompt tokens, so that a shard can always run on its own. Planning
needs only each request's size: the lines themselves are rendered when a shard is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.errors import InputError
from enrichflow.tasks.load import KEY
from enrichflow.tasks.render import LINE, string_data

TOKENS = "_tokens"  # estimated prompt tokens of a request
BYTES = "_bytes"  # bytes of its JSONL line, newline included


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # range [start, end) of the attempt's requests
    end: int
    bytes: int
    tokens: int  # estimated prompt tokens, for the enqueued-token budget

    @property
    def rows(self) -> int:
        return self.end - self.start


def plan_shards(requests: pa.Table, max_requests: int, max_bytes: int,
                max_tokens: int | None = None) -> list[Shard]:
    """Consecutive shards within the request, byte and (if given) token limits; each
    request's size is its `_bytes` and `_tokens` (a single one fits: `check_rows_fit`).
    Sizes are summed a shard's worth at a time: running sums of the whole table would be
    16 bytes a request more, 160 MB at ten million."""
    sizes, tokens = requests[BYTES], requests[TOKENS]
    shards, start = [], 0
    while start < requests.num_rows:
        byte_ends = _running_sum(sizes, start, max_requests)
        token_ends = _running_sum(tokens, start, max_requests)
        count = max(_count_within(byte_ends, max_bytes), 1)
        if max_tokens is not None:
            count = min(count, max(_count_within(token_ends, max_tokens), 1))
        shards.append(Shard(len(shards), start, start + count, int(byte_ends[count - 1]),
                            int(token_ends[count - 1])))
        start += count
    return shards


def _running_sum(sizes: pa.ChunkedArray, start: int, count: int) -> np.ndarray:
    return np.cumsum(sizes.slice(start, count).to_numpy(), dtype=np.int64)


def _count_within(ends: np.ndarray, limit: int) -> int:
    return int(np.searchsorted(ends, limit, side="right"))


def line_bytes(requests: pa.Table) -> pa.Array:
    """Each rendered line's UTF-8 bytes, its newline included."""
    return pc.binary_length(requests[LINE]).cast(pa.int32())


def check_rows_fit(requests: pa.Table, max_bytes: int, max_tokens: int | None) -> None:
    """A request that cannot fit any shard is bad input, named before anything is sent."""
    _check(requests, requests[BYTES], max_bytes, " bytes", "limits.max_bytes_per_shard")
    if max_tokens is not None:
        _check(requests, requests[TOKENS], max_tokens, " prompt tokens",
               "the enqueued-token budget (limits.enqueued_token_budget)")


def _check(requests: pa.Table, sizes: pa.ChunkedArray, limit: int, unit: str,
           setting: str) -> None:
    too_big = pc.greater(sizes, limit)
    if pc.any(too_big).as_py():
        row = pc.index(too_big, True).as_py()
        raise InputError(f"row {requests[KEY][row].as_py()!r} renders to {sizes[row].as_py():,}"
                         f"{unit}, more than {setting} ({limit:,}); shorten it or raise the "
                         "limit")


def jsonl(requests: pa.Table) -> bytes:
    """The requests' JSONL file: their lines as they lie in Arrow's buffers."""
    return string_data(requests[LINE])
