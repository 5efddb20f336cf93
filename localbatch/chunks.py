"""Answering a chunk of a batch's requests: the server's work that takes a core.

`answer_lines` turns request lines into result lines. `ChunkRunner` runs the mock
engine's larger chunks in worker processes: answering is pure Python, and in the
process that embeds the server (a run) it would hold the GIL while the run renders,
uploads and collects; in processes of their own the parts of a chunk take the cores.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import orjson

from localbatch.engines import Engine, MockEngine, error_body
from localbatch.store import new_id

# A chunk this long goes to the worker processes, in parts as long at least; a shorter one
# (a canary's batch, a test's) is answered in place, sooner than a worker would start.
WORKER_MIN_LINES = 500
WORKERS = min(os.cpu_count() or 1, 4)  # a worker takes about 70 MB


@dataclass
class Answered:
    """A chunk's result lines (JSONL, success and error files) and what they count."""

    out: bytes
    err: bytes
    completed: int
    failed: int
    usages: list[dict[str, Any]]  # of the completed requests' responses

    @classmethod
    def joined(cls, parts: list[Answered]) -> Answered:
        """The answers of a chunk's consecutive parts, as one."""
        return cls(b"".join(p.out for p in parts), b"".join(p.err for p in parts),
                   sum(p.completed for p in parts), sum(p.failed for p in parts),
                   [usage for p in parts for usage in p.usages])


def answer_lines(engine: Engine, lines: list[bytes], failing: list[bool],
                 failure_status: int) -> Answered:
    """The result lines of `lines`; a request whose `failing` is set gets a server error
    of status `failure_status` without being run (the dice are the caller's, so a seeded
    simulation fails the same requests wherever the chunk runs)."""
    requests = [orjson.loads(line) for line in lines]
    answers = iter(engine.run([(r["url"], r["body"]) for r, fail
                               in zip(requests, failing, strict=True) if not fail]))
    out, err, usages = [], [], []
    for request, fail in zip(requests, failing, strict=True):
        if fail:
            status, body = failure_status, error_body(
                "The server had an error while processing your request.", type_="server_error")
        else:
            status, body = next(answers)
        line = {"id": new_id("batch_req_", 16), "custom_id": request["custom_id"],
                "response": {"status_code": status, "request_id": new_id("req_", 16),
                             "body": body}, "error": None}
        (out if status == 200 else err).append(line)
        if status == 200:
            usages.append(body.get("usage") or {})
    return Answered(jsonl(out), jsonl(err), len(out), len(err), usages)


def jsonl(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)


class ChunkRunner:
    """Answers chunks with the server's engine: the mock engine's chunks of at least
    WORKER_MIN_LINES lines in up to WORKERS parts at once, each in a worker process
    (started as needed; the forward engine waits on its upstream, which needs no core),
    the others in place."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._workers: ProcessPoolExecutor | None = None

    def answer(self, lines: list[bytes], failing: list[bool],
               failure_status: int) -> Answered:
        parts = min(len(lines) // WORKER_MIN_LINES, WORKERS)
        if not isinstance(self.engine, MockEngine) or parts == 0:
            return answer_lines(self.engine, lines, failing, failure_status)
        if self._workers is None:
            self._workers = ProcessPoolExecutor(WORKERS, mp_context=get_context("spawn"),
                                                initializer=_start_worker,
                                                initargs=(self.engine,))
        size = -(-len(lines) // parts)
        try:
            return Answered.joined([future.result() for future in [
                self._workers.submit(_answer_in_worker, lines[start:start + size],
                                     failing[start:start + size], failure_status)
                for start in range(0, len(lines), size)]])
        except BrokenProcessPool:  # a worker was killed: new ones take the next chunk
            self.close()
            return answer_lines(self.engine, lines, failing, failure_status)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(cancel_futures=True)
            self._workers = None


_engine: Engine | None = None  # the worker process's


def _start_worker(engine: Engine) -> None:
    """Ctrl-C reaches the terminal's whole process group: the server stops the worker,
    which must not die half-way through a chunk on its own (its batch would fail). A
    server that is killed cannot stop it: it ends itself once its parent is gone."""
    global _engine
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _engine = engine
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True).start()


def _end_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _answer_in_worker(lines: list[bytes], failing: list[bool],
                      failure_status: int) -> Answered:
    assert _engine is not None
    return answer_lines(_engine, lines, failing, failure_status)
