"""Step 2, plan: split the rendered lines into shards within the provider's limits.

A shard is one batch input file: at most `max_requests` lines and `max_bytes` bytes,
counting each line's real UTF-8 bytes and its newline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.errors import InputError
from tasks.load import KEY
from tasks.render import LINE


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # row range [start, end) of the requests table
    end: int
    bytes: int

    @property
    def rows(self) -> int:
        return self.end - self.start


def plan_shards(requests: pa.Table, max_requests: int, max_bytes: int) -> list[Shard]:
    sizes = pc.binary_length(requests[LINE]).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    too_big = np.flatnonzero(sizes > max_bytes)
    if too_big.size:
        row = int(too_big[0])
        raise InputError(f"row {requests[KEY][row].as_py()!r} renders to a {sizes[row]:,}-byte "
                         f"request, more than limits.max_bytes_per_shard ({max_bytes:,}); "
                         "shorten its text or raise the limit")
    ends = np.cumsum(sizes)
    shards, start = [], 0
    while start < len(sizes):
        base = ends[start - 1] if start else 0
        by_bytes = int(np.searchsorted(ends, base + max_bytes, side="right"))
        end = min(start + max_requests, by_bytes, len(sizes))
        shards.append(Shard(len(shards), start, end, int(ends[end - 1] - base)))
        start = end
    return shards


def shard_jsonl(requests: pa.Table, shard: Shard) -> bytes:
    """The shard's JSONL file, cut straight from the Arrow string buffer."""
    lines = pc.binary_join_element_wise(requests[LINE].slice(shard.start, shard.rows),
                                        pa.scalar("\n"), "")
    lines = pc.cast(lines, pa.large_string()).combine_chunks()
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64)[lines.offset:lines.offset + len(lines) + 1]
    first, last = int(bounds[0]), int(bounds[-1])
    return data.slice(first, last - first).to_pybytes()
