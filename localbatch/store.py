"""Durable state of the local server: SQLite for objects, a folder for file bytes.

Everything a client can observe lives here, so a server killed at any moment and
started again on the same folder shows the same files and batches and carries on.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_FILE_TTL = 30 * 24 * 3600  # OpenAI keeps batch inputs and outputs 30 days by default

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL,
    data TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL,
    work TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def new_id(prefix: str, nbytes: int = 12) -> str:
    """An ID shaped like OpenAI's: `file-…`, `batch_…`, `batch_req_…`, `req_…`."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


def now() -> int:
    return int(time.time())


def rfc3339(timestamp: int | None) -> str | None:
    """A timestamp as the Anthropic and Google faces show times."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class Store:
    """Files and batches as the API shows them, plus each batch's private work record.

    A batch row keeps the public object (`data`, exactly what GET returns) apart from
    `work`: the server's own progress (next input line, bytes already written to the
    partial output and error files), which is what makes a restart resume cleanly.
    """

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.root = Path(data_dir)
        self.files_dir = self.root / "files"
        self.work_dir = self.root / "work"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._owner = (self.root / "server.lock").open("w")
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._owner.close()
            raise RuntimeError(f"another localbatch server is using {self.root}; connect to "
                               "it instead, or give this one another data folder") from exc
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "localbatch.sqlite3", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()

    # files ----------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(
        self,
        content_path: Path,
        filename: str,
        purpose: str,
        expires_after_seconds: int | None = None,
    ) -> dict[str, Any]:
        """Publish a file written elsewhere; the source stays until its owner removes it,
        so a crash between publishing and recording it can simply publish again."""
        file_id = new_id("file-")
        created = now()
        target = self.file_path(file_id)
        try:
            os.link(content_path, target)
        except OSError:
            shutil.copyfile(content_path, target)
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": target.stat().st_size,
            "created_at": created,
            "expires_at": created + expires_after_seconds if expires_after_seconds else None,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO files (id, purpose, data) VALUES (?, ?, ?)",
                (file_id, purpose, json.dumps(obj)),
            )
        return obj

    def json_lines(self, file_id: str | None) -> Iterator[dict[str, Any]]:
        """A JSONL file's lines, read one at a time (none without a file)."""
        if not file_id:
            return
        with self.file_path(file_id).open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        self.remove_expired_files()
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM files WHERE id = ? AND deleted = 0", (file_id,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def list_files(
        self, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[dict[str, Any]], bool]:
        self.remove_expired_files()
        return self._page("files", "purpose", purpose, after, limit, order)

    def remove_expired_files(self) -> None:
        """Files past their `expires_at` are gone, as at OpenAI: 404, bytes removed."""
        with self._lock, self._db:
            expired = [row[0] for row in self._db.execute(
                "SELECT id FROM files WHERE deleted = 0 AND "
                "json_extract(data, '$.expires_at') <= ?", (now(),))]
            self._db.executemany("UPDATE files SET deleted = 1 WHERE id = ?",
                                 [(file_id,) for file_id in expired])
        for file_id in expired:
            self.file_path(file_id).unlink(missing_ok=True)

    def delete_file(self, file_id: str) -> bool:
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0", (file_id,)
            )
        if cur.rowcount:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(cur.rowcount)

    # batches --------------------------------------------------------------------------

    def add_batch(self, batch: dict[str, Any], work: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO batches (id, status, data, work) VALUES (?, ?, ?, ?)",
                (batch["id"], batch["status"], json.dumps(batch), json.dumps(work)),
            )

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_work(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT work FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return json.loads(row[0])

    def save_batch(self, batch: dict[str, Any], work: dict[str, Any] | None = None) -> None:
        with self._lock, self._db:
            if work is None:
                self._db.execute(
                    "UPDATE batches SET status = ?, data = ? WHERE id = ?",
                    (batch["status"], json.dumps(batch), batch["id"]),
                )
            else:
                self._db.execute(
                    "UPDATE batches SET status = ?, data = ?, work = ? WHERE id = ?",
                    (batch["status"], json.dumps(batch), json.dumps(work), batch["id"]),
                )

    def active_batch_ids(self) -> list[str]:
        """Batches the server still has to move, oldest first."""
        marks = ",".join("?" * len(TERMINAL_STATUSES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM batches WHERE status NOT IN ({marks}) ORDER BY seq",
                tuple(TERMINAL_STATUSES),
            ).fetchall()
        return [r[0] for r in rows]

    def list_batches(self, after: str | None, limit: int, id_prefix: str
                     ) -> tuple[list[dict[str, Any]], bool]:
        """A page of one face's batches (their ids start with `id_prefix`), newest first."""
        return self._page("batches", None, None, after, limit, "desc", id_prefix)

    def delete_batch(self, batch_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    # counters -------------------------------------------------------------------------

    def bump_counter(self, name: str) -> int:
        """Increase a named counter and return its new value; survives restarts."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1",
                (name,),
            )
            return self._db.execute(
                "SELECT value FROM counters WHERE name = ?", (name,)
            ).fetchone()[0]

    # ----------------------------------------------------------------------------------

    def _page(
        self,
        table: str,
        filter_column: str | None,
        filter_value: str | None,
        after: str | None,
        limit: int,
        order: str,
        id_prefix: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of a cursor-paginated list, as OpenAI's `after`/`limit` lists work."""
        descending = order == "desc"
        clauses, params = [], []
        if table == "files":
            clauses.append("deleted = 0")
        if id_prefix:
            clauses.append("substr(id, 1, ?) = ?")
            params += [len(id_prefix), id_prefix]
        if filter_column and filter_value:
            clauses.append(f"{filter_column} = ?")
            params.append(filter_value)
        if after:
            with self._lock:
                row = self._db.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
            if row:
                clauses.append("seq < ?" if descending else "seq > ?")
                params.append(row[0])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        direction = "DESC" if descending else "ASC"
        with self._lock:
            rows = self._db.execute(
                f"SELECT data FROM {table} {where} ORDER BY seq {direction} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        items = [json.loads(r[0]) for r in rows[:limit]]
        return items, len(rows) > limit
