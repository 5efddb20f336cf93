"""One output location, local or object storage, through fsspec.

Writes are staged: a file is written under `_staging/` (a name readers skip) and then
moved into place, so a reader or a crash never meets a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from enrichflow.errors import StorageError

STAGING = "_staging"
CONFLICT_ATTEMPTS = 10  # of a conditional put that S3 answers 409 (about 2.75 s)


@dataclass(frozen=True)
class Versioned:
    """A small JSON file as read, with what a conditional replace of it must find."""

    value: Any | None  # None: empty or not JSON (being created, or cut short by a kill)
    version: str  # its ETag on S3; on local disk, the sha256 of its bytes
    age: float  # seconds since it was last written


class Location:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.root = url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise StorageError(f"output {uri}: cannot open this location: {exc}") from exc
        self.root = self.root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        with self._errors("read", name):
            return self.fs.exists(self.path(name))

    def version(self, name: str) -> str | None:
        """A key that changes when `name` does (fsspec's `ukey`: an ETag on S3); None if
        there is no such file."""
        try:
            with self._errors("read", name, expected=FileNotFoundError):
                return self.fs.ukey(self.path(name))
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> Any | None:
        try:
            with self._errors("read", name, expected=FileNotFoundError), \
                    self.fs.open(self.path(name), "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def read_parquet(self, name: str, columns: list[str] | None = None,
                     filters: Any = None) -> pa.Table:
        with self._errors("read", name), self.fs.open(self.path(name), "rb") as handle:
            return pq.read_table(handle, columns=columns, filters=filters)

    @contextmanager
    def open(self, name: str) -> Iterator[Any]:
        """`name` open for reading, for a streamed read."""
        with self._errors("read", name), self.fs.open(self.path(name), "rb") as handle:
            yield handle

    def create_json(self, name: str, value: Any) -> bool:
        """Write `name` only if it does not exist (O_EXCL locally, a conditional put on
        S3), atomically with respect to every other writer; False if it exists."""
        data = json.dumps(value).encode()
        if not self.is_local:
            return self._put_if(name, data, IfNoneMatch="*")
        with self._errors("write", name):
            self.fs.makedirs(self.path(name).rsplit("/", 1)[0], exist_ok=True)
        try:
            with self._errors("write", name, expected=FileExistsError), \
                    self.fs.open(self.path(name), "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
        return True

    def read_versioned(self, name: str) -> Versioned | None:
        """`name` with its version and age, to replace it only if it is unchanged
        (`replace_json`); None if there is no such file."""
        path = self.path(name)
        try:
            with self._errors("read", name, expected=FileNotFoundError):
                self.fs.invalidate_cache(path)  # a listing cached earlier is stale here
                info = self.fs.info(path)  # the version first: a newer body only makes
                data = self.fs.cat_file(path)  # the replace fail, never succeed wrongly
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        modified = self.fs.modified(path) if self.is_local else info["LastModified"]
        return Versioned(value, _digest(data) if self.is_local else info["ETag"],
                         time.time() - modified.timestamp())

    def replace_json(self, name: str, value: Any, version: str) -> bool:
        """Write `name` only if it is still at `version` (`read_versioned`), in one step
        that no other writer can come between: S3's conditional put on the ETag; on local
        disk, the compare and the rename under an advisory lock of the folder. False if it
        changed or is gone."""
        data = json.dumps(value).encode()
        if not self.is_local:
            return self._put_if(name, data, IfMatch=version)
        path = self.path(name)
        with self._errors("write", name), self._folder_locked(path.rsplit("/", 1)[0]):
            try:
                with open(path, "rb") as handle:
                    if _digest(handle.read()) != version:
                        return False
            except FileNotFoundError:
                return False
            self.write_bytes(name, data)
        return True

    def _put_if(self, name: str, data: bytes, **condition: str) -> bool:
        """Put `data` at `name` on object storage only if `condition` holds (S3's
        conditional put, `IfNoneMatch="*"` or `IfMatch=<ETag>`: one step that no other
        writer comes between); False if it does not. While another conditional write of
        the object is in flight, S3 may answer 409 ConditionalRequestConflict and asks
        for the put to be tried again: it is, until one of the writers has won."""
        path = self.path(name)
        try:
            for attempt in range(CONFLICT_ATTEMPTS):
                with self._errors("write", name):
                    try:
                        self.fs.pipe_file(path, data, **condition)
                        return True
                    except FileExistsError:
                        return False
                    except OSError as exc:
                        code = _s3_error_code(exc)
                        if code in ("PreconditionFailed", "NoSuchKey"):  # changed; gone
                            return False
                        if code != "ConditionalRequestConflict":
                            raise
                time.sleep(0.05 * (attempt + 1))
        finally:
            self.fs.invalidate_cache(path)
        raise StorageError(f"cannot write {self.uri}/{name}: other writers kept it busy "
                           f"through {CONFLICT_ATTEMPTS} tries (409 "
                           f"ConditionalRequestConflict); run again")

    @contextmanager
    def _folder_locked(self, folder: str) -> Iterator[None]:
        """An exclusive advisory lock of a local folder; the kernel frees it when its
        holder dies, so a killed process never leaves it held."""
        handle = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, json.dumps(value, indent=2, default=str).encode())

    def write_parquet(self, name: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(name, buffer.getvalue())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `name` whole or not at all: staged under `_staging/`, then moved."""
        with self._staged(name) as staged, self.fs.open(staged, "wb") as handle:
            handle.write(data)

    def put_file(self, name: str, local_path: str) -> None:
        """Copy a local file to `name`, whole or not at all."""
        with self._staged(name) as staged:
            self.fs.put_file(local_path, staged)

    @contextmanager
    def _staged(self, name: str) -> Iterator[str]:
        staged = self.path(f"{STAGING}/{uuid.uuid4().hex}-{name.replace('/', '_')}")
        with self._errors("write", name):
            if self.is_local:  # object stores have no folders (and s3fs would make a bucket)
                self.fs.makedirs(self.path(STAGING), exist_ok=True)
                self.fs.makedirs(self.path(name).rsplit("/", 1)[0], exist_ok=True)
            yield staged
            self.fs.mv(staged, self.path(name))

    def list(self, pattern: str) -> list[str]:
        """Names of the files that match a glob `pattern` (in one folder), as they are now:
        not from s3fs's cache of listings, which another process's writes do not clear."""
        with self._errors("list", pattern):
            self.fs.invalidate_cache(self.path(pattern).rsplit("/", 1)[0])
            return sorted(path.rsplit("/", 1)[-1] for path in self.fs.glob(self.path(pattern)))

    def remove(self, name: str) -> None:
        """Remove `name` (a file or a folder); removing one already gone is no error."""
        try:
            with self._errors("remove", name, expected=FileNotFoundError):
                self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass

    @contextmanager
    def _errors(self, action: str, name: str,
                expected: type[Exception] | tuple[type[Exception], ...] | None = None
                ) -> Iterator[None]:
        """Any storage failure as one StorageError that names the file and the fix, but
        the `expected` one (a missing file when reading, an existing one when creating),
        which the caller handles."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # s3fs, botocore and aiohttp raise more than OSError
            if expected is not None and isinstance(exc, expected):
                raise
            hint = ("check that the folder exists and that you may write in it"
                    if self.is_local else
                    "check that the bucket exists, your credentials, and, for S3-compatible "
                    "storage, the endpoint: storage_options.endpoint_url in the job file, or "
                    "AWS_ENDPOINT_URL in the environment (what `enrichflow status` and "
                    "`cancel` read)")
            raise StorageError(f"cannot {action} {self.uri}/{name} ({type(exc).__name__}: "
                               f"{exc}); {hint}") from exc


def _s3_error_code(exc: OSError) -> str | None:
    """The S3 error code behind an error s3fs translated (it keeps botocore's as cause)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
