"""Step 2, plan: split the rendered lines into shards within the provider's limits.

A shard is one batch input file: at most `max_requests` lines, `max_bytes` bytes
(each line's real UTF-8 bytes and its newline) and, under an enqueued-token budget,
`max_tokens` estimated prompt tokens, so that a shard can always run on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.errors import InputError
from tasks.load import KEY
from tasks.render import LINE

TOKENS = "_tokens"


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # row range [start, end) of the requests table
    end: int
    bytes: int
    tokens: int  # estimated prompt tokens, for the enqueued-token budget

    @property
    def rows(self) -> int:
        return self.end - self.start


def plan_shards(requests: pa.Table, max_requests: int, max_bytes: int,
                max_tokens: int | None = None) -> list[Shard]:
    """Consecutive shards within the request, byte and (if given) token limits; the
    requests' estimated prompt tokens are their `_tokens` column."""
    sizes = pc.binary_length(requests[LINE]).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    tokens = requests[TOKENS].to_numpy()
    _check_rows_fit(requests, sizes, max_bytes, " bytes", "limits.max_bytes_per_shard")
    byte_ends = np.cumsum(sizes)
    token_ends = np.cumsum(tokens)
    if max_tokens is not None:
        _check_rows_fit(requests, tokens, max_tokens, " prompt tokens",
                        "the enqueued-token budget (limits.enqueued_token_budget)")
    shards, start = [], 0
    while start < len(sizes):
        end = min(start + max_requests, len(sizes), _end_within(byte_ends, start, max_bytes))
        if max_tokens is not None:
            end = min(end, _end_within(token_ends, start, max_tokens))
        shards.append(Shard(len(shards), start, end, _span(byte_ends, start, end),
                            _span(token_ends, start, end)))
        start = end
    return shards


def _end_within(ends: np.ndarray, start: int, limit: int) -> int:
    base = ends[start - 1] if start else 0
    return int(np.searchsorted(ends, base + limit, side="right"))


def _span(ends: np.ndarray, start: int, end: int) -> int:
    return int(ends[end - 1] - (ends[start - 1] if start else 0))


def _check_rows_fit(requests: pa.Table, sizes: np.ndarray, limit: int, unit: str,
                    setting: str) -> None:
    too_big = np.flatnonzero(sizes > limit)
    if too_big.size:
        row = int(too_big[0])
        raise InputError(f"row {requests[KEY][row].as_py()!r} renders to {sizes[row]:,}{unit}, "
                         f"more than {setting} ({limit:,}); shorten it or raise the limit")


def shard_jsonl(requests: pa.Table, shard: Shard) -> bytes:
    """The shard's JSONL file, cut straight from the Arrow string buffer."""
    lines = pc.binary_join_element_wise(requests[LINE].slice(shard.start, shard.rows),
                                        pa.scalar("\n"), "")
    lines = pc.cast(lines, pa.large_string()).combine_chunks()
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64)[lines.offset:lines.offset + len(lines) + 1]
    first, last = int(bounds[0]), int(bounds[-1])
    return data.slice(first, last - first).to_pybytes()
