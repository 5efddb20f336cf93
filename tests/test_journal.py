"""The run journal on local disk and on a real S3 endpoint (moto server): what it costs to
write as a run goes on, and what a resumed run reads back."""

from __future__ import annotations

import pyarrow as pa

from enrichflow.flows.send import ShardRun
from enrichflow.storage import Location
from enrichflow.tasks.load import ROW
from enrichflow.tasks.plan import BYTES, TOKENS, Shard
from enrichflow.tasks.state import STATE_FILE, RunState, ShardRecord, WrittenResults


def journal_bytes(location: Location) -> int:
    with location.open(STATE_FILE) as handle:
        return len(handle.read())


def started(state: RunState, shard: int) -> ShardRecord:
    """A shard journaled as a run journals it up to its batch."""
    record = state.record(1, shard, rows=10, size=1_000, sha256=f"{shard:064x}", tokens=100)
    state.update(record, status="submitted", file_id=f"file-{shard}", batch_id=f"batch-{shard}")
    return record


def test_a_journal_write_costs_the_same_at_the_first_shard_and_the_hundredth(location):
    state, _ = RunState.open(location, "job", "config", "data", {"kind": "local"}, force=False)
    sizes = []
    for shard in range(100):
        record = started(state, shard)
        sizes.append(journal_bytes(location))  # one shard in flight
        state.mark_collected(record, WrittenResults(shard * 10, shard * 10 + 9, 0, 0))
    # one shard's record is ~400 bytes; the last in flight differ by their numbers' digits
    assert max(sizes) - min(sizes) < 10, "run.json grows with the shards collected"

    again = RunState.load(location)
    assert [(r.shard, r.status, r.first_row) for r in again.shards] == [
        (shard, "collected", shard * 10) for shard in range(100)]


def test_a_kill_between_a_final_record_and_the_journal_leaves_the_shard_collected(location):
    state, _ = RunState.open(location, "job", "config", "data", {"kind": "local"}, force=False)
    record = started(state, 0)
    before = location.read_json(STATE_FILE)  # shard 0 submitted
    state.mark_collected(record, WrittenResults(0, 9, 0, 0))
    location.write_json(STATE_FILE, before)  # as a kill left it: the final record written,
    # run.json not yet

    (again,) = RunState.load(location).shards
    assert (again.status, again.first_row, again.last_row) == ("collected", 0, 9)
    assert RunState.load(location).awaited() == [], "not waited for, not collected again"


def test_a_shard_planned_with_32_bit_sizes_is_the_one_journaled_with_64_bit_ones(location):
    """Prepare keeps each request's tokens and bytes in 32 bits (16 bytes a row for the
    whole run): a run journaled when they were 64 bits resumes its very shards."""
    state, _ = RunState.open(location, "job", "config", "data", {"kind": "local"}, force=False)
    rows = pa.array(range(100, 110), pa.int64())
    sizes = [pa.array([120 + i for i in range(10)], width) for width in (pa.int64(), pa.int32())]
    before, now = (pa.table({ROW: rows, TOKENS: s, BYTES: s}) for s in sizes)
    shard = Shard(0, 2, 8, bytes=sum(range(122, 128)), tokens=sum(range(122, 128)))
    old = ShardRun.of(state, 1, before, shard)
    assert ShardRun.of(state, 1, now, shard).record is old.record
    assert old.rows.to_pylist() == list(range(102, 108))
    assert old.rows.buffers()[1].address == rows.buffers()[1].address, \
        "the queue holds a view of the rows, not a copy for each shard"
