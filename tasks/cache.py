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
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from enrichflow.storage import Location
from enrichflow.tasks.render import LINE, string_buffers

HASH = "_request_hash"
DEFAULT_FILE = "_cache/answers.parquet"
DIGEST = "S64"  # a request's hash, its sha256 in hex, as numpy's fixed-width bytes
_KNOWN: dict[tuple, np.ndarray] = {}  # the requests a cache answered, by file and version
_KNOWN_LOCK = threading.Lock()
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


def _digests(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The hashes as sorted, distinct DIGEST values, to search (an Arrow `is_in` would
    hash a million kept hashes again for every batch it is asked about)."""
    return np.unique(hashes.to_numpy(zero_copy_only=False).astype(DIGEST))


def _among(hashes: pa.Array | pa.ChunkedArray, digests: np.ndarray) -> np.ndarray:
    """Which of `hashes` are among the sorted `digests`."""
    if not len(digests):
        return np.zeros(len(hashes), dtype=bool)
    asked = hashes.to_numpy(zero_copy_only=False).astype(DIGEST)
    return digests[np.searchsorted(digests, asked).clip(max=len(digests) - 1)] == asked


@dataclass
class AnswerCache:
    """Where the kept answers live, and the version of that file the run started with
    (less the answers of `excluded` batches, which are not reused). Which requests it
    answered is read where it is asked, once per process and version: a scan task on a
    Dask worker reads it there, rather than have it shipped along with every task."""

    location: Location
    name: str
    version: str | None  # the file's fsspec key when the run started; None: no file
    excluded: list[str]
    _fresh: list[pa.Array] = field(default_factory=list, repr=False)
    _writer: pq.ParquetWriter | None = field(default=None, repr=False)
    _scratch: str | None = field(default=None, repr=False)
    _next_group: int = field(default=0, repr=False)  # where `answers_for` looks first

    @classmethod
    def open(cls, uri: str | None, output: Location, storage_options: dict | None,
             excluded: list[str]) -> AnswerCache:
        if uri is None:
            location, name = output, DEFAULT_FILE
        else:
            parent, _, name = uri.rstrip("/").rpartition("/")
            location = Location(parent, storage_options)
        return cls(location, name, location.version(name), excluded)

    @property
    def _canaries(self) -> str:
        """Beside the answers: the requests whose canary passed, and when."""
        return f"{self.name.rpartition('/')[0]}/canaries.json".lstrip("/")

    def canary_passed(self, request_hash: str) -> dict | None:
        """The canary that `request_hash` passed before (when, its rows), if any."""
        return (self.location.read_json(self._canaries) or {}).get(request_hash)

    def remember_canary(self, request_hash: str, verdict: dict) -> None:
        passed = self.location.read_json(self._canaries) or {}
        self.location.write_json(self._canaries, {**passed, request_hash: verdict})

    def reused(self, hashes: pa.Array) -> pa.Array:
        """Which of `hashes` have a kept answer."""
        return pa.array(_among(hashes, self._known()))

    def _known(self) -> np.ndarray:
        key = (self.location.uri, self.name, self.version, tuple(self.excluded))
        with _KNOWN_LOCK:
            if key not in _KNOWN:
                _KNOWN.clear()  # one cache's requests at a time
                _KNOWN[key] = self._read_known()
            return _KNOWN[key]

    def _read_known(self) -> np.ndarray:
        """The kept hashes, sorted."""
        if self.version is None or not self.location.exists(self.name):
            return np.array([], DIGEST)
        kept = self.location.read_parquet(self.name, columns=[HASH, "_batch_id"])
        hashes = kept.filter(pc.invert(pc.is_in(kept["_batch_id"], value_set=pa.array(
            self.excluded, pa.string()))))[HASH]
        return _digests(hashes)

    def answers_for(self, hashes: pa.Array) -> pa.Table:
        """The kept answer (CACHED columns) of each of `hashes` that has one. The file is
        read a row group at a time, a group's answers only if it has one asked for, from
        the group where the last call found its last answer, until every hash has one:
        a run keeps its answers in the order of its parts, so the next run's parts find
        theirs in a group or two, not in a read of the whole file each."""
        if len(hashes) == 0 or not self.location.exists(self.name):
            return CACHED.empty_table()
        asked, found = _digests(hashes), []
        missing = np.ones(len(asked), dtype=bool)
        excluded = pa.array(self.excluded, pa.string())
        with self.location.open(self.name) as handle:
            kept = pq.ParquetFile(handle)
            groups, first = kept.num_row_groups, self._next_group
            for group in ((first + i) % groups for i in range(groups)):
                wanted = _among(kept.read_row_group(group, columns=[HASH])[HASH], asked)
                if not wanted.any():
                    continue
                table = kept.read_row_group(group, columns=CACHED.names).cast(CACHED)
                table = table.filter(wanted)
                table = table.filter(pc.invert(pc.is_in(table["_batch_id"], value_set=excluded)))
                if table.num_rows:
                    found.append(table)
                    missing[np.searchsorted(asked, _digests(table[HASH]))] = False
                    self._next_group = group
                    if not missing.any():
                        break
        return pa.concat_tables(found) if found else CACHED.empty_table()

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
        fresh = _digests(pa.chunked_array(self._fresh, pa.string()))
        if self.location.exists(self.name):
            with self.location.open(self.name) as handle:
                kept = pq.ParquetFile(handle)
                for group in range(kept.num_row_groups):
                    table = kept.read_row_group(group, columns=CACHED.names).cast(CACHED)
                    self._writer.write_table(table.filter(~_among(table[HASH], fresh)))
        self._writer.close()
        try:
            self.location.put_file(self.name, self._scratch)
        finally:
            os.remove(self._scratch)
            self._writer, self._fresh = None, []
