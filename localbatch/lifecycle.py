"""The batch state machine: create, validate, run, finalize, expire, cancel.

It knows nothing of HTTP (the routes call it) and keeps every step durable in the
`Store`, so a restarted server resumes each batch where its last saved step ended.
A worker thread calls `tick()` repeatedly; each call moves every unfinished batch on.
The requests themselves are answered by a `ChunkRunner` (`localbatch.chunks`).
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from localbatch.chunks import ChunkRunner, jsonl
from localbatch.engines import BATCH_ENDPOINTS, Engine
from localbatch.errors import APIError, not_found
from localbatch.simulation import Dice, Simulation
from localbatch.store import BATCH_FILE_TTL, TERMINAL_STATUSES, Store, new_id, now
from localbatch.tokens import prompt_tokens
from localbatch.webhooks import WebhookSender

ANTHROPIC_MAX_REQUESTS = 100_000  # Message Batches' limit a batch
# a batch's id says the face it belongs to; each face lists its own
ID_PREFIXES = {"openai": "batch_", "azure": "batch_", "anthropic": "msgbatch_",
               "gemini": "gbatch"}
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
MAX_REPORTED_ERRORS = 100

log = logging.getLogger("localbatch")


class Lifecycle:
    def __init__(self, store: Store, engine: Engine, simulation: Simulation):
        self.store = store
        self.engine = engine
        self.sim = simulation
        self.dice = Dice(simulation.seed)
        self.chunks = ChunkRunner(engine)
        self._lock = threading.RLock()
        self._lines: dict[str, InputLines] = {}  # input of running batches
        self.webhooks = (WebhookSender(simulation.webhook_url, simulation.webhook_secret)
                         if simulation.webhook_url else None)

    # requests from clients ----------------------------------------------------------

    def create(self, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict[str, str] | None, output_ttl: int | None,
               dialect: str = "openai") -> dict:
        """A new batch; `output_ttl`: seconds its output and error files live, if set.
        The face it is created through (`dialect`) sets its rules: Azure's takes up to
        Azure's requests a file and is never expired (Azure lets a job run past its
        24-hour target); Anthropic's takes its 100,000 requests, counted from the start,
        and requests of any model."""
        if completion_window != "24h":
            raise APIError(400, "completion_window must be '24h'.", param="completion_window")
        if endpoint not in BATCH_ENDPOINTS:
            raise APIError(400, f"Invalid endpoint '{endpoint}'. Supported: "
                           f"{', '.join(sorted(BATCH_ENDPOINTS))}.", param="endpoint")
        _check_metadata(metadata)
        input_file = self.store.get_file(input_file_id)
        if input_file is None:
            raise not_found("file", input_file_id)
        if input_file["purpose"] != "batch":
            raise APIError(400, f"File {input_file_id} has purpose '{input_file['purpose']}'; "
                           "a batch input must be uploaded with purpose 'batch'.",
                           param="input_file_id")
        created = now()
        batch = {
            "id": new_id(ID_PREFIXES[dialect], 16), "object": "batch", "endpoint": endpoint,
            "model": None, "errors": None, "input_file_id": input_file_id,
            "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": created,
            "in_progress_at": None,
            "expires_at": created + int(self.sim.completion_window_seconds),
            "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            # Anthropic counts a batch's requests from its start; OpenAI once validated
            "request_counts": {"total": len(InputLines(self.store.file_path(input_file_id)))
                               if dialect == "anthropic" else 0, "completed": 0, "failed": 0},
            "usage": _zero_usage(), "metadata": metadata,
        }
        work = {"phase_started": time.time(), "deadline": None if dialect == "azure" else
                time.time() + self.sim.completion_window_seconds,
                "max_requests": {"azure": self.sim.azure_max_requests_per_batch,
                                 "anthropic": ANTHROPIC_MAX_REQUESTS}.get(
                    dialect, self.sim.max_requests_per_batch), "dialect": dialect,
                "next_line": 0, "out_bytes": 0,
                "err_bytes": 0, "enqueued_tokens": 0, "expire_after": None, "credit": 0.0,
                "last_tick": time.time(), "output_ttl": output_ttl}
        self.store.add_batch(batch, work)
        return batch

    def cancel(self, batch_id: str) -> dict:
        with self._lock:
            batch = self.store.get_batch(batch_id)
            if batch is None:
                raise not_found("batch", batch_id)
            if batch["status"] in ("validating", "in_progress", "finalizing"):
                work = self.store.get_work(batch_id)
                work["phase_started"] = time.time()
                batch.update(status="cancelling", cancelling_at=now())
                self.store.save_batch(batch, work)
            elif batch["status"] != "cancelling":
                # 400, not 409: the SDK retries a 409 three times, to the same answer
                raise APIError(400, f"Cannot cancel a batch with status '{batch['status']}'.",
                               param="batch_id")
            return batch

    # the worker ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the chunks' worker processes and the webhooks' sender."""
        self.chunks.close()
        if self.webhooks is not None:
            self.webhooks.close()

    def tick(self) -> bool:
        """Move every unfinished batch one step; True when requests were answered. With
        no processing rate set, the server answers as fast as it can and its running
        batches form one queue, oldest first, one chunk a tick: the first batch finishes
        (and is collected) while the later ones wait, as at a provider, instead of all
        together at the end. A step that fails ends its batch as `failed` with an error
        the client can read (logged once): retrying the same step would fail the same
        way, for ever, holding the batch's enqueued tokens."""
        one_queue = not (self.sim.requests_per_second or self.sim.tokens_per_second)
        answered = False
        for batch_id in self.store.active_batch_ids():
            try:
                with self._lock:
                    answered |= self._step(batch_id, may_answer=not (one_queue and answered))
            except Exception as exc:
                log.exception("batch %s: step failed; the batch fails", batch_id)
                with self._lock:
                    self._fail(batch_id, exc)
            if self.webhooks is not None:
                self._announce_if_ended(batch_id)
        return answered

    def _announce_if_ended(self, batch_id: str) -> None:
        """The webhook of a batch of the OpenAI face that its last step ended (it is
        stepped no more: one event a batch)."""
        batch = self.store.get_batch(batch_id)
        if (batch["status"] in TERMINAL_STATUSES
                and self.store.get_work(batch_id).get("dialect", "openai") == "openai"):
            self.webhooks.batch_ended(batch)

    def _fail(self, batch_id: str, exc: Exception) -> None:
        batch, work = self.store.get_batch(batch_id), self.store.get_work(batch_id)
        batch.update(status="failed", failed_at=now(), errors={"object": "list", "data": [
            _batch_error("server_error", f"localbatch could not process this batch "
                                         f"({type(exc).__name__}: {exc}).")]})
        self.store.save_batch(batch, work)
        self._lines.pop(batch_id, None)

    def _step(self, batch_id: str, may_answer: bool) -> bool:
        """One step of the batch; True when it answered requests (only if `may_answer`)."""
        batch = self.store.get_batch(batch_id)
        work = self.store.get_work(batch_id)
        elapsed = time.time() - work["phase_started"]
        status = batch["status"]
        if status == "validating":
            if _past_deadline(work):
                self._finish(batch, work, "expired", EXPIRED_MESSAGE, "batch_expired")
            elif elapsed >= self.sim.validating_seconds:
                self._validate(batch, work)
        elif status == "in_progress":
            expired = _past_deadline(work) or (
                work["expire_after"] is not None and work["next_line"] >= work["expire_after"])
            if expired:
                self._finish(batch, work, "expired", EXPIRED_MESSAGE, "batch_expired")
            elif may_answer:
                return self._run_chunk(batch, work)
        elif status == "finalizing":
            if elapsed >= self.sim.finalizing_seconds:
                self._finish(batch, work, "completed", "", "")
        elif status == "cancelling":
            if elapsed >= self.sim.cancelling_seconds:
                self._finish(batch, work, "cancelled", CANCELLED_MESSAGE, "batch_cancelled")
        return False

    def _validate(self, batch: dict, work: dict) -> None:
        lines = InputLines(self.store.file_path(batch["input_file_id"]))
        errors, model, tokens = self._check_lines(
            lines, batch["endpoint"], work.get("max_requests", self.sim.max_requests_per_batch),
            one_model=work.get("dialect") != "anthropic")
        if not errors:
            limit = self.sim.token_limit(model)
            enqueued = self._enqueued_tokens(model)
            if limit is not None and enqueued + tokens > limit:
                errors.append(_batch_error(
                    "token_limit_exceeded",
                    f"Enqueued token limit reached for {model} in organization org-localbatch. "
                    f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
                    "batches have been completed."))
        if errors:
            batch.update(status="failed", failed_at=now(),
                         errors={"object": "list", "data": errors[:MAX_REPORTED_ERRORS]})
            self.store.save_batch(batch, work)
            return
        if self.sim.expire_batches and self.sim.expire_after_requests < len(lines):
            if self.store.bump_counter("forced_expiries") <= self.sim.expire_batches:
                work["expire_after"] = self.sim.expire_after_requests
        self._lines[batch["id"]] = lines
        work.update(phase_started=time.time(), last_tick=time.time(), enqueued_tokens=tokens,
                    total=len(lines))
        batch.update(status="in_progress", in_progress_at=now(), model=model,
                     request_counts={"total": len(lines), "completed": 0, "failed": 0})
        self.store.save_batch(batch, work)

    def _check_lines(self, lines: InputLines, endpoint: str, max_requests: int,
                     one_model: bool = True) -> tuple[list[dict], str, int]:
        """Validation errors of an input file as OpenAI reports them, its model, its tokens.
        Without `one_model` (Anthropic's batches), requests may name different models or
        none: a request's own error, when it is answered."""
        if not lines:
            return [_batch_error("empty_file", "The batch input file is empty.")], "", 0
        if len(lines) > max_requests:
            return [_batch_error(
                "too_many_tasks",
                f"The batch input file has {len(lines):,} requests; the limit is "
                f"{max_requests:,}.")], "", 0
        errors: list[dict] = []
        seen: set[str] = set()
        models: set[str] = set()
        tokens = 0
        for number, line in enumerate(lines, start=1):
            try:
                request = orjson.loads(line)
            except ValueError:
                errors.append(_batch_error(
                    "invalid_json_line", "This line is not parseable as valid JSON.", line=number))
                continue
            missing = [k for k in ("custom_id", "method", "url", "body")
                       if not isinstance(request, dict) or k not in request]
            if missing:
                errors.append(_batch_error("missing_required_parameter",
                                           f"Missing required parameter: '{missing[0]}'.",
                                           line=number, param=missing[0]))
                continue
            if not isinstance(request["custom_id"], str) or not request["custom_id"]:
                errors.append(_batch_error("invalid_custom_id",
                                           "The custom_id must be a non-empty string.",
                                           line=number, param="custom_id"))
                continue
            if request["custom_id"] in seen:
                errors.append(_batch_error(
                    "duplicate_custom_id",
                    f"The custom_id '{request['custom_id']}' is used more than once.",
                    line=number, param="custom_id"))
            seen.add(request["custom_id"])
            if request["method"] != "POST":
                errors.append(_batch_error("invalid_method", "The method must be 'POST'.",
                                           line=number, param="method"))
            if request["url"] != endpoint:
                errors.append(_batch_error(
                    "url_mismatch",
                    f"The url '{request['url']}' does not match the batch endpoint '{endpoint}'.",
                    line=number, param="url"))
            body = request["body"] if isinstance(request["body"], dict) else {}
            model = body.get("model")
            if not one_model:
                models.add(model if isinstance(model, str) else "")
                tokens += prompt_tokens(endpoint, body)
                continue
            if not isinstance(model, str):
                errors.append(_batch_error("missing_required_parameter",
                                           "Missing required parameter: 'body.model'.",
                                           line=number, param="body.model"))
                continue
            if models and model not in models:
                errors.append(_batch_error(
                    "model_mismatch",
                    f"The model '{model}' differs from '{next(iter(models))}': a batch input "
                    "file may use only one model.", line=number, param="body.model"))
            models.add(model)
            tokens += prompt_tokens(endpoint, body)
        return errors, next(iter(models), ""), tokens

    def _enqueued_tokens(self, model: str) -> int:
        total = 0
        for other_id in self.store.active_batch_ids():
            other = self.store.get_batch(other_id)
            if other["model"] == model and other["status"] in ("in_progress", "finalizing"):
                total += self.store.get_work(other_id)["enqueued_tokens"]
        return total

    def _input_lines(self, batch: dict) -> InputLines:
        """The batch's input lines; after a restart, found again and partial work files
        trimmed."""
        lines = self._lines.get(batch["id"])
        if lines is None:
            lines = InputLines(self.store.file_path(batch["input_file_id"]))
            self._lines[batch["id"]] = lines
            work = self.store.get_work(batch["id"])
            for kind in ("out", "err"):
                path = self._work_file(batch["id"], kind)
                if path.exists():
                    with path.open("r+b") as handle:
                        handle.truncate(work[f"{kind}_bytes"])
        return lines

    def _run_chunk(self, batch: dict, work: dict) -> bool:
        lines = self._input_lines(batch)
        start = work["next_line"]
        if start >= len(lines):
            work["phase_started"] = time.time()
            batch.update(status="finalizing", finalizing_at=now())
            self.store.save_batch(batch, work)
            return False
        count = self._allowance(work, lines)
        if work["expire_after"] is not None:
            count = min(count, work["expire_after"] - start)
        if count <= 0:
            self.store.save_batch(batch, work)
            return False
        answered = self.chunks.answer(
            lines[start:start + count],
            [self.dice.roll(self.sim.request_failure_rate) for _ in range(count)],
            self.sim.request_failure_status)
        counts = batch["request_counts"]
        counts["completed"] += answered.completed
        counts["failed"] += answered.failed
        for usage in answered.usages:
            _add_usage(batch["usage"], usage)
        work["out_bytes"] += self._append(batch["id"], "out", answered.out)
        work["err_bytes"] += self._append(batch["id"], "err", answered.err)
        work["next_line"] = start + count
        self.store.save_batch(batch, work)
        return True

    def _allowance(self, work: dict, lines: InputLines) -> int:
        """How many requests this tick may run under the configured processing rate."""
        tick = time.time()
        elapsed, work["last_tick"] = tick - work["last_tick"], tick
        count = min(self.sim.chunk_size, len(lines) - work["next_line"])
        if self.sim.requests_per_second:
            work["credit"] = min(work["credit"] + elapsed * self.sim.requests_per_second,
                                 float(self.sim.chunk_size))
            count = min(count, int(work["credit"]))
            work["credit"] -= count
        elif self.sim.tokens_per_second:
            work["credit"] += elapsed * self.sim.tokens_per_second
            allowed = 0
            for line in lines[work["next_line"]:work["next_line"] + count]:
                request = orjson.loads(line)
                cost = prompt_tokens(request["url"], request["body"])
                if cost > work["credit"]:
                    break
                work["credit"] -= cost
                allowed += 1
            count = allowed
        return count

    def _finish(self, batch: dict, work: dict, status: str, message: str, code: str) -> None:
        """Turn a batch terminal: the unrun requests get `code`, the files are published."""
        lines = self._input_lines(batch) if batch["in_progress_at"] else []
        unrun = [orjson.loads(line) for line in lines[work["next_line"]:]] if code else []
        if unrun:
            work["err_bytes"] += self._append(batch["id"], "err", jsonl([
                {"id": new_id("batch_req_", 16), "custom_id": r["custom_id"], "response": None,
                 "error": {"code": code, "message": message}} for r in unrun]))
            batch["request_counts"]["failed"] += len(unrun)
            work["next_line"] = len(lines)
        ttl = work.get("output_ttl") or BATCH_FILE_TTL
        for kind, field, label in (("out", "output_file_id", "output"),
                                   ("err", "error_file_id", "error")):
            if work[f"{kind}_bytes"]:
                published = self.store.add_file(self._work_file(batch["id"], kind),
                                                 f"{batch['id']}_{label}.jsonl",
                                                 "batch_output", ttl)
                batch[field] = published["id"]
        batch.update(status=status, **{f"{status}_at": now()})
        self.store.save_batch(batch, work)
        for kind in ("out", "err"):
            self._work_file(batch["id"], kind).unlink(missing_ok=True)
        self._lines.pop(batch["id"], None)

    def _work_file(self, batch_id: str, kind: str) -> Path:
        return self.store.work_dir / f"{batch_id}.{kind}.jsonl"

    def _append(self, batch_id: str, kind: str, data: bytes) -> int:
        if not data:
            return 0
        with self._work_file(batch_id, kind).open("ab") as handle:
            handle.write(data)
        return len(data)


class InputLines:
    """The non-blank lines of a batch input file, read from disk as they are needed: a
    running batch holds where its lines are, not the lines (a few bytes a request)."""

    def __init__(self, path: Path):
        self.path = path
        self._starts, self._ends = array("q"), array("q")
        offset = 0
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    self._starts.append(offset)
                    self._ends.append(offset + len(line.rstrip(b"\n")))
                offset += len(line)

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield line.rstrip(b"\n")

    def __getitem__(self, span: slice) -> list[bytes]:
        starts, ends = self._starts[span], self._ends[span]
        if not starts:
            return []
        with self.path.open("rb") as handle:
            handle.seek(starts[0])
            data = handle.read(ends[-1] - starts[0])
        return [data[start - starts[0]:end - starts[0]]
                for start, end in zip(starts, ends, strict=True)]


def _batch_error(code: str, message: str, line: int | None = None,
                 param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _zero_usage() -> dict[str, Any]:
    return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0}


def _add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add one response's usage (chat or embeddings shape) to a batch's usage."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
    total["input_tokens"] += prompt
    total["output_tokens"] += completion
    total["total_tokens"] += prompt + completion
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    total["input_tokens_details"]["cached_tokens"] += cached
    total["output_tokens_details"]["reasoning_tokens"] += reasoning


def _past_deadline(work: dict) -> bool:
    """Past its completion window (a batch with none, Azure's, never is)."""
    return work["deadline"] is not None and time.time() >= work["deadline"]


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > 16:
        raise APIError(400, "metadata may hold at most 16 pairs.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise APIError(400, f"metadata['{key[:64]}']: keys are strings of at most 64 "
                           "characters, values strings of at most 512.", param="metadata")
