"""Answering a chunk of a batch's requests: the server's work that takes a core.

`answer_lines` turns request lines into result lines. `ChunkRunner` runs the mock
engine's larger chunks in worker processes: answering is pure Python, and in the
process that embeds the server (a run) it would hold the GIL while the run renders,
uploads and collects; in processes of their own the parts of a chunk take the cores.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
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
        self._workers: list[_Worker] = []

    def answer(self, lines: list[bytes], failing: list[bool],
               failure_status: int) -> Answered:
        parts = min(len(lines) // WORKER_MIN_LINES, WORKERS)
        if not isinstance(self.engine, MockEngine) or parts == 0:
            return answer_lines(self.engine, lines, failing, failure_status)
        size = -(-len(lines) // parts)
        starts = range(0, len(lines), size)
        try:
            while len(self._workers) < len(starts):
                self._workers.append(_Worker(self.engine))
            busy = self._workers[:len(starts)]
            for worker, start in zip(busy, starts, strict=True):
                worker.send((lines[start:start + size], failing[start:start + size],
                             failure_status))
            return Answered.joined([worker.receive() for worker in busy])
        except (OSError, EOFError, pickle.UnpicklingError):  # a worker was killed:
            self.close()  # new ones take the next chunk
            return answer_lines(self.engine, lines, failing, failure_status)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []


class _Worker:
    """A process of its own answering the parts of chunks that come down its stdin, one
    at a time. Not one of multiprocessing's: those import the script that started them
    again, and a user's script without an `if __name__ == "__main__":` guard would run
    its whole job again in each worker."""

    def __init__(self, engine: Engine):
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from localbatch.chunks import work; work()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
        self.send(engine)

    def send(self, message: Any) -> None:
        assert self.process.stdin is not None
        pickle.dump(message, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.process.stdin.flush()

    def receive(self) -> Answered:
        assert self.process.stdout is not None
        return pickle.load(self.process.stdout)

    def close(self) -> None:
        """The end of its input ends it; one that does not end soon is killed."""
        with suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def work() -> None:
    """A worker's life: its engine, then parts to answer, until its server closes the
    pipe or is gone. Ctrl-C reaches the terminal's whole process group: the server stops
    the worker, which must not die half-way through a part on its own (its batch would
    fail)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = sys.stdin.buffer
    sink = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not mix in
    engine = pickle.load(source)
    while True:
        try:
            lines, failing, failure_status = pickle.load(source)
        except EOFError:
            return
        try:
            pickle.dump(answer_lines(engine, lines, failing, failure_status), sink,
                        protocol=pickle.HIGHEST_PROTOCOL)
            sink.flush()
        except BrokenPipeError:  # the server is gone
            return
