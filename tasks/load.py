"""Step 1, load: stream the dataset in record batches and give each row a stable key.

A dataset is one file, a folder (hive-partitioned or not) or a glob of CSV, Parquet or
JSONL files, local or on object storage. It is never read whole: each pass over it
(prepare, send, merge) streams it in record batches, so memory holds a batch, not the
table. Rows are numbered in file order (files sorted by path), and the key (the
configured id column, else the row number) is what ties an answer back to its row across
shards, attempts and re-runs; it must be unique and never empty.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from enrichflow.config import DatasetConfig
from enrichflow.errors import InputError

KEY = "_key"
ROW = "_row"  # the row's number in the dataset, from 0
BLOCK_BYTES = 64 * 1024 * 1024  # the largest cell or JSON line a file may hold
SMALL_BLOCK_BYTES = 1024 * 1024  # text is parsed in blocks this small (memory), if it can
INFER_BYTES = 4 * 1024 * 1024  # column types come from the rows of a text file's first block
BATCH_ROWS = 16_384  # rows a pass works on at once
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
           ".ndjson": "jsonl"}


@dataclass
class Source:
    """The dataset of a job: its files, in order, and how to read them. Small and plain,
    so a task on another process or host can open it again."""

    dataset: DatasetConfig
    storage_options: dict[str, Any]
    files: list[str]  # full paths, sorted
    format: str
    root: str  # hive partitions are read from the path below it
    text_columns: list[str] = field(default_factory=list)  # CSV columns read as text
    # whatever their first rows look like (see TypesWidened)
    _fs: Any = field(default=None, repr=False, compare=False)
    # a text file's column types as its first block shows them, found once for all passes
    _schemas: dict[str, pa.Schema | None] = field(default_factory=dict, repr=False,
                                                  compare=False)
    _counts: list[int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, dataset: DatasetConfig, storage_options: dict[str, Any] | None = None
             ) -> Source:
        """The dataset's files; errors name the path and what to do."""
        options = storage_options or {}
        try:
            fs, path = url_to_fs(dataset.path, **options)
            if any(c in path for c in "*?["):
                root = path.split("*")[0].rsplit("/", 1)[0]
                files = sorted(f for f in fs.glob(path) if _is_data(f, root, dataset.format))
            elif fs.isdir(path):
                files = sorted(f for f in fs.find(path) if _is_data(f, path, dataset.format))
                root = path
            elif fs.exists(path):
                files, root = [path], path.rsplit("/", 1)[0]
            else:
                raise FileNotFoundError(path)
        except FileNotFoundError as exc:
            close = _close_path(fs, path, dataset.path)
            hint = (f"check the path (relative paths start from the directory you run in, "
                    f"{os.getcwd()})" if "://" not in dataset.path else
                    "check the bucket and key, and that the credentials and "
                    "storage_options.endpoint_url (or AWS_ENDPOINT_URL) are those of "
                    "the store that holds it")
            raise InputError(f"dataset.path: {dataset.path} does not exist"
                             + (f" (did you mean {close}?)" if close else "") + f"; {hint}"
                             ) from exc
        except Exception as exc:  # s3fs, botocore and aiohttp raise more than OSError
            raise InputError(f"dataset.path: cannot read {dataset.path} ({type(exc).__name__}: "
                             f"{exc}); for S3 check the bucket, your credentials and "
                             "storage_options.endpoint_url") from exc
        if not files:
            raise InputError(f"dataset.path: {dataset.path} matches no CSV, Parquet or JSONL "
                             "file; check the path, or the files' extensions")
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        full = [f if local else fs.unstrip_protocol(f) for f in files]
        return cls(dataset, options, full, _format(dataset, files), root, _fs=fs)

    @property
    def fs(self):
        if self._fs is None:
            self._fs = url_to_fs(self.files[0], **self.storage_options)[0]
        return self._fs

    def fingerprint(self) -> str:
        """sha256 of the files' bytes, so a changed dataset is noticed."""
        digest = hashlib.sha256()
        for path in self.files:
            with self.fs.open(path, "rb") as handle:
                while chunk := handle.read(8 * 1024 * 1024):
                    digest.update(chunk)
        return digest.hexdigest()

    def row_counts(self) -> list[int] | None:
        """Each file's rows when its metadata tells them (Parquet); None for text files,
        whose rows are known only by parsing them."""
        if self.format == "parquet" and self._counts is None:
            counts = []
            for path in self.files:
                try:
                    with self.fs.open(path, "rb") as handle:
                        counts.append(pq.ParquetFile(handle).metadata.num_rows)
                except (pa.ArrowInvalid, OSError) as exc:
                    raise self._unreadable(path, exc) from exc
            self._counts = counts
        return self._counts

    def pieces(self, rows: int) -> list[tuple[int, int | None]]:
        """Ranges of rows [start, stop) of about `rows` rows each that tasks can read
        apart: runs of whole files whose row counts the metadata tells (files before a
        range are skipped, not read); else the whole dataset, one range."""
        counts = self.row_counts()
        if counts is None or len(counts) == 1:
            return [(0, None)]
        ranges, start, end = [], 0, 0
        for count in counts:
            end += count
            if end - start >= rows:
                ranges.append((start, end))
                start = end
        if end > start or not ranges:
            ranges.append((start, end))
        limit = self.dataset.limit
        if limit is not None:
            ranges = [(a, min(b, limit)) for a, b in ranges if a < limit] or [(0, limit)]
        return ranges

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.RecordBatch]:
        """Rows [start, stop) (all by default, up to dataset.limit), checked, with `_key`
        and `_row`, in record batches of at most BATCH_ROWS rows."""
        limit = self.dataset.limit
        stop = limit if stop is None else stop if limit is None else min(stop, limit)
        offset, seen = 0, False
        for index, path in enumerate(self.files):
            if self._counts is not None and offset + self._counts[index] <= start:
                offset += self._counts[index]  # a file before the range: skipped unread
                seen = seen or self._counts[index] > 0
                continue
            for batch in self._read_file(path):
                seen = seen or batch.num_rows > 0
                end = offset + batch.num_rows
                if end > start and (stop is None or offset < stop):
                    cut = batch.slice(max(start - offset, 0))
                    if stop is not None:
                        cut = cut.slice(0, stop - max(start, offset))
                    if cut.num_rows:
                        yield from self._with_keys(cut, max(start, offset))
                offset = end
                if stop is not None and offset >= stop:
                    return
        if not seen:
            raise InputError(f"dataset.path: {self.dataset.path} has no rows; nothing to enrich")

    def _with_keys(self, batch: pa.RecordBatch, first_row: int) -> Iterator[pa.RecordBatch]:
        if any(c.startswith("_") for c in batch.schema.names):  # `_key`, every output `_…`
            raise InputError(f"{self.dataset.path}: column names starting with '_' are "
                             "reserved for enrichflow's own columns; rename them")
        for begin in range(0, batch.num_rows, BATCH_ROWS):
            part = batch.slice(begin, BATCH_ROWS)
            rows = pa.array(range(first_row + begin, first_row + begin + part.num_rows),
                            pa.int64())
            yield part.append_column(KEY, self._keys(part, first_row + begin)) \
                .append_column(ROW, rows)

    def _read_file(self, path: str) -> Iterator[pa.RecordBatch]:
        """The file's rows, checked, with its hive partition columns. Text is parsed in
        small blocks, with the column types the first rows show; a file with a longer
        cell or line is read again in large blocks, from where it was."""
        partitions = _hive_partitions(path, self.root)
        done = 0
        for block_bytes in (SMALL_BLOCK_BYTES, BLOCK_BYTES):
            try:
                read = 0
                with self.fs.open(path, "rb") as handle:
                    if path not in self._schemas and self.format != "parquet":
                        # A copy of the head, not the handle: Arrow reads ahead in the
                        # background, and an abandoned reader would race the next one.
                        head = io.BytesIO(handle.read(2 * INFER_BYTES))
                        first = next(iter(self._parse(head, path, INFER_BYTES)), None)
                        self._schemas[path] = None if first is None else first.schema
                        handle.seek(0)
                    for batch in self._parse(handle, path, block_bytes,
                                             self._schemas.get(path)):
                        batch, read = batch.slice(max(done - read, 0)), read + batch.num_rows
                        if not batch.num_rows:
                            continue
                        _check_text(batch, self.format, path, done)
                        done += batch.num_rows
                        for name, value in partitions.items():
                            batch = batch.append_column(name, pa.array([value] * batch.num_rows))
                        yield batch
                return
            except InputError:
                raise
            except (pa.ArrowInvalid, OSError) as exc:
                if "straddle" in str(exc) and block_bytes < BLOCK_BYTES:
                    continue
                raise self._unreadable(path, exc) from exc

    def _unreadable(self, path: str, exc: Exception) -> InputError:
        told = "dataset.format" if self.dataset.format else "told from its extension"
        return InputError(f"dataset.path: {path} is not readable as {self.format} ({told}): "
                          f"{exc}. Check the file, or set dataset.format to the format it "
                          "is in: csv, parquet or jsonl")

    def _parse(self, handle, path: str, block_bytes: int,
               schema: pa.Schema | None = None) -> Iterator[pa.RecordBatch]:
        """The file's record batches; text in blocks of `block_bytes`, typed as `schema`
        (if given)."""
        if self.format == "parquet":
            yield from pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS)
            return
        encoding = self.dataset.encoding
        if self.format == "jsonl":
            stream = pa.PythonFile(handle, mode="r")
            if encoding != "utf-8":
                stream = pa.transcoding_input_stream(stream, encoding, "utf-8")
            yield from pyarrow.json.open_json(
                stream, read_options=pyarrow.json.ReadOptions(block_size=block_bytes),
                parse_options=pyarrow.json.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="infer"))
            return
        invalid: list[Any] = []

        def first_invalid_row(row) -> str:
            invalid.append(row)
            return "error"

        try:
            yield from pyarrow.csv.open_csv(
                handle, read_options=pyarrow.csv.ReadOptions(
                    block_size=block_bytes, encoding=encoding, use_threads=False),
                parse_options=pyarrow.csv.ParseOptions(invalid_row_handler=first_invalid_row),
                convert_options=pyarrow.csv.ConvertOptions(column_types=None if schema is None
                                                           else self._types(schema)))
        except pa.ArrowInvalid as exc:
            widened = _misfit_column(exc, schema)
            if widened is not None and widened not in self.text_columns:
                self.text_columns.append(widened)
                raise TypesWidened(widened) from exc
            if not invalid:
                raise
            raise InputError(f"dataset.path: {path} is not readable as csv (line "
                             f"{self._line_of(path, invalid[0])}): {exc}. Check the file, or "
                             "set dataset.format") from exc

    def _types(self, schema: pa.Schema) -> dict[str, pa.DataType]:
        return {f.name: pa.string() if f.name in self.text_columns else f.type for f in schema}

    def _line_of(self, path: str, row) -> str:
        """The 1-based line of the file that reads `row` (the header is line 1), or '?'."""
        if row.number is not None and row.number > 0:
            return f"{row.number:,}"
        with self.fs.open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.decode(self.dataset.encoding, "replace").rstrip("\r\n") == row.text:
                    return f"{number:,}"
        return "?"

    def _keys(self, batch: pa.RecordBatch, first_row: int) -> pa.Array:
        dataset = self.dataset
        if dataset.id_column is None:
            return pc.cast(pa.array(range(first_row, first_row + batch.num_rows), pa.int64()),
                           pa.string())
        if dataset.id_column not in batch.schema.names:
            raise InputError(f"dataset.id_column: {dataset.id_column!r} is not a column of "
                             f"{dataset.path}; columns are {', '.join(batch.schema.names)}")
        column = batch.column(dataset.id_column)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_integer(column.type)):
            raise InputError(f"dataset.id_column: {dataset.id_column!r} of {dataset.path} holds "
                             f"{column.type} values; an id column holds text or integers: "
                             "choose another column, or leave id_column out to key rows by "
                             "number")
        keys = pc.cast(column, pa.string())
        missing = pc.or_(pc.is_null(keys), pc.equal(pc.utf8_length(keys), 0))
        if pc.any(missing).as_py():
            row = first_row + pc.index(missing, True).as_py()
            raise InputError(f"{dataset.path}: row {row + 1} has an empty id in "
                             f"{dataset.id_column!r}; every row needs an id")
        return keys


class TypesWidened(Exception):
    """A CSV column held a value that the type its first rows showed cannot: the pass
    over the dataset starts again with the column read as text (`Source.text_columns`),
    so that every pass and every output part types it alike."""


def _misfit_column(exc: pa.ArrowInvalid, schema: pa.Schema | None) -> str | None:
    """The column a CSV conversion error names ("In CSV column #2: ... CSV conversion
    error to int64 ..."), if it is one."""
    found = re.search(r"In CSV column #(\d+): .*CSV conversion error", str(exc))
    if found is None or schema is None or int(found.group(1)) >= len(schema):
        return None
    return schema.field(int(found.group(1))).name


def key_hashes(keys: pa.Array) -> pa.Array:
    """64-bit hashes of rows' keys: what the uniqueness check keeps of a row over the
    whole table (8 bytes, not the key's text: 10 million titles would take ~350 MB)."""
    import pandas as pd  # its hash_array hashes text in C; pyarrow has no such kernel

    return pa.array(pd.util.hash_array(keys.to_numpy(zero_copy_only=False),
                                       categorize=False), pa.uint64())


def check_unique_keys(hashes: pa.ChunkedArray, source: Source) -> None:
    """Ids must be unique over the whole dataset (row numbers are). Their `key_hashes`
    are compared; the rows whose hashes repeat are read again and their ids compared
    (two ids of one hash are not a repeat)."""
    dataset = source.dataset
    if dataset.id_column is None:
        return
    ordered = hashes.to_numpy()  # sorted in place: 8 bytes a row, not 16
    if not ordered.flags.writeable:  # a view of Arrow's memory
        ordered = ordered.copy()
    ordered.sort()
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return
    suspects = pa.array(repeated, pa.uint64())
    keys = pa.chunked_array([batch.column(KEY).filter(
        pc.is_in(key_hashes(batch.column(KEY)), value_set=suspects))
        for batch in source.batches()], pa.string())
    counts = pc.value_counts(keys)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0]["values"].as_py()
        raise InputError(f"{dataset.path}: {len(repeated)} value(s) of id column "
                         f"{dataset.id_column!r} appear more than once (e.g. {example!r}); "
                         "ids must be unique: fix the data or choose another id_column")


class RowReader:
    """Reads rows of a source by ascending ranges in one forward pass: each range takes
    up where the last one ended, so reading a dataset's shards in order reads it once.
    A range before the last starts a new pass."""

    def __init__(self, source: Source):
        self.source = source
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._position = 0  # global row number of `_pending`'s first row
        self._pending: pa.RecordBatch | None = None

    def read(self, start: int, stop: int) -> pa.Table:
        if self._batches is None or start < self._position:
            self.close()
            self._batches, self._position, self._pending = self.source.batches(start), start, None
        taken: list[pa.RecordBatch] = []
        while self._position < stop:
            if self._pending is None or self._pending.num_rows == 0:
                self._pending = next(self._batches, None)
                if self._pending is None:
                    break
            skip = max(start - self._position, 0)
            if skip >= self._pending.num_rows:
                self._position += self._pending.num_rows
                self._pending = None
                continue
            take = min(self._pending.num_rows - skip, stop - self._position - skip)
            taken.append(self._pending.slice(skip, take))
            self._pending = self._pending.slice(skip + take)
            self._position += skip + take
        return pa.Table.from_batches(taken) if taken else pa.table({})

    def close(self) -> None:
        """End the pass: a reader left open over a file when Python exits aborts it."""
        if self._batches is not None:
            self._batches.close()
        self._batches, self._pending = None, None

    def take(self, rows: list[int] | pa.Array) -> pa.Table:
        """The given rows (ascending row numbers), reading only the span they cover."""
        rows = pa.array(rows, pa.int64())
        if len(rows) == 0:
            return pa.table({})
        first, last = rows[0].as_py(), rows[-1].as_py() + 1
        parts = []
        for begin in range(first, last, BATCH_ROWS * 4):
            end = min(begin + BATCH_ROWS * 4, last)
            wanted = rows.filter(pc.and_(pc.greater_equal(rows, begin), pc.less(rows, end)))
            if len(wanted):
                parts.append(self.read(begin, end).take(pc.subtract(wanted, begin)))
        return pa.concat_tables(parts)


def _close_path(fs: Any, path: str, written: str) -> str | None:
    """The entry beside a missing `path` whose name is closest to its name, if one is
    close (`movie.csv` → `movies.csv`), as `written` (the user's spelling of `path`)."""
    folder, _, name = path.rstrip("/").rpartition("/")
    try:
        names = [entry.rstrip("/").rpartition("/")[2] for entry in fs.ls(folder or "/",
                                                                           detail=False)]
    except (OSError, ValueError):
        return None
    close = difflib.get_close_matches(name, names, n=1)
    if not close:
        return None
    parent = written.rstrip("/").rpartition("/")[0]
    return f"{parent}/{close[0]}" if parent else close[0]


def _is_data(path: str, root: str, fmt: str | None) -> bool:
    """A data file of a dataset folder or glob: nothing below the root is hidden or named
    with a `_` (Parquet writers' `_SUCCESS`, our own `_manifest.json` and `_state/`), and
    its extension is a known format's, unless the job names the format."""
    below = PurePosixPath(path[len(root.rstrip("/")) + 1:]).parts
    return not any(p.startswith(("_", ".")) for p in below) and \
        (fmt is not None or PurePosixPath(path).suffix.lower() in FORMATS)


def _format(dataset: DatasetConfig, files: list[str]) -> str:
    if dataset.format:
        return dataset.format
    found = {FORMATS.get(PurePosixPath(f.split("?")[0]).suffix.lower()) for f in files}
    if len(found) != 1 or None in found:
        raise InputError(f"dataset.format: cannot tell the format of {dataset.path!r} from "
                         "its files' extensions; set dataset.format to csv, parquet or jsonl")
    return found.pop()


def _hive_partitions(path: str, root: str) -> dict[str, str]:
    """`name=value` folders between the dataset's root and the file, as columns."""
    relative = path.split("://", 1)[-1][len(root.rstrip("/")) + 1:]
    folders = PurePosixPath(relative).parts[:-1]
    return dict(part.split("=", 1) for part in folders if "=" in part)


def _check_text(batch: pa.RecordBatch, fmt: str, path: str, first_row: int) -> None:
    """Every text column, used by the template or not, holds valid UTF-8, before anything
    is paid: bytes that are not would be written as a binary column, or break the run
    after its batches were paid for. (A binary column of a Parquet file is data.)"""
    for name in batch.schema.names:
        column = batch.column(name)
        if fmt != "parquet" and pa.types.is_binary(column.type):
            bad = _first_not_utf8(column)
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column.validate(full=True)
                continue
            except pa.ArrowInvalid:
                bad = _first_not_utf8(column.cast(pa.binary()))
        else:
            continue
        raise InputError(f"{path}: column {name!r} is not UTF-8 text (row "
                         f"{first_row + bad + 1:,}); set "
                         "dataset.encoding to the file's encoding (e.g. latin-1 or cp1252), "
                         "or fix the data")


def _first_not_utf8(column: pa.Array) -> int:
    for row, value in enumerate(column.to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return row
    return 0
