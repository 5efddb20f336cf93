"""Pay only for what changed: answers are kept by the hash of the request that got them.

A request is identified by its body (model, messages, parameters), never by its row or
`custom_id`, so a re-run over a grown table sends only the new rows, and a changed prompt
or model sends everything again. Kept answers live in one Parquet file, by default
`<output>/_cache/answers.parquet`, or at `cache.uri` to share it between outputs. It is
never held whole: a run reads its hashes, the answers of each part as that part is
written, and writes the file anew by streaming, the newest answer of a request first.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from enrichflow.storage import Location
from tasks.render import LINE, string_buffers

HASH = "_request_hash"
DEFAULT_FILE = "_cache/answers.parquet"
CACHED = pa.schema([(HASH, pa.string()), ("_answer", pa.string()),
                    ("_finish_reason", pa.string()), ("_batch_id", pa.string())])


def request_hashes(requests: pa.Table) -> pa.Array:
    """sha256 of each line's body: everything after its `custom_id` field, up to its
    newline."""
    hashes = []
    lines = requests[LINE]
    starts = iter(pc.find_substring(lines, '"method"').to_pylist())  # bytes into each line
    for data, bounds in string_buffers(lines):
        for begin, end in zip(bounds, bounds[1:], strict=False):
            hashes.append(hashlib.sha256(data[begin + next(starts):end - 1]).hexdigest())
    return pa.array(hashes, pa.string())


@dataclass
class AnswerCache:
    """Where the kept answers live, and which requests they answered when the run started
    (less the answers of `excluded` batches, which are not reused)."""

    location: Location
    name: str
    known: pa.Array
    excluded: list[str]
    _fresh: list[pa.Array] = field(default_factory=list, repr=False)
    _writer: pq.ParquetWriter | None = field(default=None, repr=False)
    _scratch: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, uri: str | None, output: Location, storage_options: dict | None,
             excluded: list[str]) -> AnswerCache:
        if uri is None:
            location, name = output, DEFAULT_FILE
        else:
            parent, _, name = uri.rstrip("/").rpartition("/")
            location = Location(parent, storage_options)
        known = pa.array([], pa.string())
        if location.exists(name):
            kept = location.read_parquet(name, columns=[HASH, "_batch_id"])
            known = kept.filter(pc.invert(pc.is_in(
                kept["_batch_id"], value_set=pa.array(excluded, pa.string()))))[HASH]
            known = known.combine_chunks()
        return cls(location, name, known, excluded)

    def reused(self, hashes: pa.Array) -> pa.Array:
        """Which of `hashes` have a kept answer."""
        return pc.is_in(hashes, value_set=self.known)

    def answers_for(self, hashes: pa.Array) -> pa.Table:
        """The kept answer (CACHED columns) of each of `hashes` that has one."""
        if len(hashes) == 0 or not self.location.exists(self.name):
            return CACHED.empty_table()
        kept = self.location.read_parquet(self.name, filters=pc.is_in(
            pc.field(HASH), value_set=hashes)).select(CACHED.names).cast(CACHED)
        return kept.filter(pc.invert(pc.is_in(
            kept["_batch_id"], value_set=pa.array(self.excluded, pa.string()))))

    def add(self, answers: pa.Table) -> None:
        """Keep this run's new answers (CACHED columns); written by `save`."""
        if answers.num_rows == 0:
            return
        if self._writer is None:
            handle, self._scratch = tempfile.mkstemp(suffix=".parquet")
            os.close(handle)
            self._writer = pq.ParquetWriter(self._scratch, CACHED)
        self._writer.write_table(answers.select(CACHED.names).cast(CACHED))
        self._fresh.append(answers[HASH].combine_chunks())

    def save(self) -> None:
        """The new answers, then the kept ones of other requests as the file is now
        (other outputs may share it), as the cache file."""
        if self._writer is None:
            return
        fresh = pa.concat_arrays(self._fresh)
        if self.location.exists(self.name):
            with self.location.open(self.name) as handle:
                kept = pq.ParquetFile(handle)
                for group in range(kept.num_row_groups):
                    table = kept.read_row_group(group, columns=CACHED.names).cast(CACHED)
                    self._writer.write_table(table.filter(pc.invert(pc.is_in(
                        table[HASH], value_set=fresh))))
        self._writer.close()
        try:
            self.location.put_file(self.name, self._scratch)
        finally:
            os.remove(self._scratch)
            self._writer, self._fresh = None, []
