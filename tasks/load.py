"""Step 1, load: read the dataset into Arrow and give each row a stable key.

The key (the configured id column, else the row number) is what ties an answer back to
its row across shards, attempts and re-runs; it must be unique and never empty.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from enrichflow.config import DatasetConfig
from enrichflow.errors import InputError

KEY = "_key"


@dataclass(frozen=True)
class Rows:
    table: pa.Table  # the dataset's columns plus `_key` (string)
    fingerprint: str  # sha256 of the bytes read, so a changed dataset is noticed


def load_rows(dataset: DatasetConfig, storage_options: dict[str, Any] | None = None) -> Rows:
    """Read the dataset named by the job; errors name the path and what to do."""
    try:
        with fsspec.open(dataset.path, "rb", **(storage_options or {})) as handle:
            raw = handle.read()
    except FileNotFoundError as exc:
        raise InputError(f"dataset.path: {dataset.path} does not exist; check the path "
                         f"(relative paths start from the directory you run in, "
                         f"{os.getcwd()})") from exc
    except Exception as exc:  # s3fs, botocore and aiohttp raise more than OSError
        raise InputError(f"dataset.path: cannot read {dataset.path} ({type(exc).__name__}: "
                         f"{exc}); for S3 check the bucket, your credentials and "
                         "storage_options.endpoint_url") from exc
    fmt = dataset.resolved_format
    recode = fmt != "parquet" and dataset.encoding != "utf-8"
    table = _parse(_recode(raw, dataset) if recode else raw, fmt, dataset.path)
    _check_text(table, fmt, dataset.path)
    if dataset.limit is not None:
        table = table.slice(0, dataset.limit)
    if table.num_rows == 0:
        raise InputError(f"dataset.path: {dataset.path} has no rows; nothing to enrich")
    if any(c.startswith("_") for c in table.column_names):  # `_key` and every output `_…`
        raise InputError(f"{dataset.path}: column names starting with '_' are reserved for "
                         "enrichflow's own columns; rename them")
    table = table.append_column(KEY, _keys(table, dataset))
    return Rows(table=table, fingerprint=hashlib.sha256(raw).hexdigest())


BLOCK_BYTES = 64 * 1024 * 1024  # the largest cell or JSON line a file may hold


def _parse(raw: bytes, fmt: str, path: str) -> pa.Table:
    invalid: list[str] = []

    def first_invalid_row(row) -> str:
        invalid.append(row.text)
        return "error"

    try:
        if fmt == "csv":
            return pyarrow.csv.read_csv(
                io.BytesIO(raw), read_options=pyarrow.csv.ReadOptions(block_size=BLOCK_BYTES),
                parse_options=pyarrow.csv.ParseOptions(invalid_row_handler=first_invalid_row))
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(raw))
        return pyarrow.json.read_json(
            io.BytesIO(raw), read_options=pyarrow.json.ReadOptions(block_size=BLOCK_BYTES))
    except (pa.ArrowInvalid, OSError) as exc:
        where = f" (line {_line_of(raw, invalid[0])})" if invalid else ""
        raise InputError(f"dataset.path: {path} is not readable as {fmt}{where}: {exc}. Check "
                         "the file, or set dataset.format") from exc


def _line_of(raw: bytes, text: str) -> str:
    """The 1-based line of the file that reads `text` (the header is line 1), or '?'."""
    for number, line in enumerate(raw.decode(errors="replace").splitlines(), start=1):
        if line == text:
            return f"{number:,}"
    return "?"


def _recode(raw: bytes, dataset: DatasetConfig) -> bytes:
    try:
        return raw.decode(dataset.encoding).encode()
    except UnicodeDecodeError as exc:
        raise InputError(f"dataset.path: {dataset.path} is not {dataset.encoding} text at byte "
                         f"{exc.start:,}; set dataset.encoding to the file's encoding") from exc


def _check_text(table: pa.Table, fmt: str, path: str) -> None:
    """Every text column, used by the template or not, holds valid UTF-8, before anything
    is paid: bytes that are not would be written as a binary column, or break the run
    after its batches were paid for. (A binary column of a Parquet file is data.)"""
    for name in table.column_names:
        column = table[name]
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
        raise InputError(f"{path}: column {name!r} is not UTF-8 text (row {bad + 1:,}); set "
                         "dataset.encoding to the file's encoding (e.g. latin-1 or cp1252), "
                         "or fix the data")


def _first_not_utf8(column: pa.ChunkedArray) -> int:
    for row, value in enumerate(column.to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return row
    return 0


def _keys(table: pa.Table, dataset: DatasetConfig) -> pa.Array:
    if dataset.id_column is None:
        return pa.array([str(i) for i in range(table.num_rows)], pa.string())
    if dataset.id_column not in table.column_names:
        raise InputError(f"dataset.id_column: {dataset.id_column!r} is not a column of "
                         f"{dataset.path}; columns are {', '.join(table.column_names)}")
    column = table[dataset.id_column]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_integer(column.type)):
        raise InputError(f"dataset.id_column: {dataset.id_column!r} of {dataset.path} holds "
                         f"{column.type} values; an id column holds text or integers: choose "
                         "another column, or leave id_column out to key rows by number")
    keys = pc.cast(column, pa.string()).combine_chunks()
    missing = pc.or_(pc.is_null(keys), pc.equal(pc.utf8_length(keys), 0))
    if pc.any(missing).as_py():
        row = pc.index(missing, True).as_py()
        raise InputError(f"{dataset.path}: row {row + 1} has an empty id in "
                         f"{dataset.id_column!r}; every row needs an id")
    counts = pc.value_counts(keys)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0]["values"].as_py()
        raise InputError(f"{dataset.path}: {len(repeated)} value(s) of id column "
                         f"{dataset.id_column!r} appear more than once (e.g. {example!r}); "
                         "ids must be unique: fix the data or choose another id_column")
    return keys

