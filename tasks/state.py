"""The run's journal, `<output>/_state/run.json`: every side effect, before and after.

A shard's record says `uploading` before its file goes up, holds the file id after,
says `creating` before the batch is created and holds the batch id after. A re-run
reads it and re-attaches to what exists instead of paying for it again. Collected
results are kept beside it, so a resumed run never needs an expired output file.

A collected shard's record is final: it moves out of `run.json` into a small file beside
the shard's results (`_state/results/attempt-A-shard-S.json`). `run.json` holds the
shards not collected yet (about `limits.max_shards_in_flight`), so that writing it costs
the same at the first shard of a run and at the thousandth; `RunState.load` reads both.

A cancel request (`enrichflow cancel`, or the run cancelled in Prefect) is kept beside it
too, naming the run it is for: it holds while that run suspends, resumes or is restarted
by Prefect (the same flow run), until the run ends. Starting the job again (another flow
run) is a new request to run it, which clears the old cancel.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.errors import StorageError
from enrichflow.providers import Intent
from enrichflow.storage import Location
from enrichflow.tasks.lease import Lease
from enrichflow.tasks.load import ROW
from enrichflow.tasks.render import CUSTOM_ID

STATE_FILE = "_state/run.json"
CANCEL_FILE = "_state/cancel-requested.json"
ATTEMPT = "_attempt"  # of a result: its attempt
RESULTS_DIR = "_state/results"
CANARY_RESULTS = f"{RESULTS_DIR}/canary.parquet"  # the canary's journaled answers
CANARY_SHARD = -1  # the canary's results are journaled as this shard of attempt 1
CANARY_BATCH = "canary"  # a synchronous canary's answers carry `canary-<run id>` as batch
# rows a deadline took out of their batches carry `now-<run id>-<shard>` as batch, or
# `flex-...` when OpenAI's flex tier answered them (at batch prices)
NOW_BATCH, FLEX_BATCH = "now", "flex"
SYNC_PRICED = (f"{CANARY_BATCH}-", f"{NOW_BATCH}-")  # batch ids of synchronous prices
SENT_NOW = (f"{NOW_BATCH}-", f"{FLEX_BATCH}-")  # batch ids of rows a deadline answered


def batch_id_starts(batch_ids: pa.Array | pa.ChunkedArray,
                    prefixes: tuple[str, ...]) -> pa.Array | pa.ChunkedArray:
    """Whether each `_batch_id` starts with one of `prefixes` (False where null)."""
    found = pc.starts_with(batch_ids, prefixes[0])
    for prefix in prefixes[1:]:
        found = pc.or_(found, pc.starts_with(batch_ids, prefix))
    return pc.fill_null(found, False)


@dataclass
class ShardRecord:
    attempt: int
    shard: int
    rows: int
    bytes: int
    sha256: str
    status: str = "planned"  # planned, uploading, uploaded, creating, submitted, collected;
    # or split: refused for token_limit_exceeded, its rows went on as smaller shards
    submission: int = 1  # goes up when a batch is created again after token_limit_exceeded
    file_id: str | None = None
    batch_id: str | None = None
    batch_status: str | None = None
    request_counts: dict[str, int] | None = None
    start: int | None = None  # a piece of a split shard: its first row in the attempt
    parent: int | None = None  # a piece of a split shard: the shard it was cut from
    creating_at: float | None = None  # when its batch was asked for (re-attach looks after)
    tokens: int = 0  # its estimated prompt tokens (what an interrupted run says it costs)
    tokens_lease: str | None = None  # the Prefect lease holding them (`tasks.ledger`)
    first_row: int | None = None  # collected: the dataset rows its results are of, from...
    last_row: int | None = None  # ...to (both included)
    prompt_tokens: int = 0  # collected: the tokens its results were billed (usage), what
    completion_tokens: int = 0  # the run has paid (`tasks.spend`)

    @property
    def canary(self) -> bool:
        return self.shard == CANARY_SHARD

    @property
    def name(self) -> str:
        return "the canary" if self.canary else f"attempt {self.attempt}, shard {self.shard}"

    @property
    def results_name(self) -> str:
        if self.canary:
            return CANARY_RESULTS
        return f"{RESULTS_DIR}/attempt-{self.attempt}-shard-{self.shard}.parquet"

    @property
    def record_name(self) -> str:
        """Its final record, once collected (`RunState.mark_collected`)."""
        return self.results_name.removesuffix(".parquet") + ".json"

    @property
    def requests_name(self) -> str:
        """Its rows and their `custom_id`s (written as it goes up, read to collect it)."""
        return f"{RESULTS_DIR}/attempt-{self.attempt}-shard-{self.shard}-requests.parquet"


@dataclass(frozen=True)
class WrittenResults:
    """What the journal keeps of a shard's written results."""

    first_row: int
    last_row: int
    prompt_tokens: int
    completion_tokens: int


def write_results(location: Location, record: ShardRecord, results: pa.Table
                  ) -> WrittenResults:
    """Write a shard's results where its journal entry says."""
    attempt = pa.array([record.attempt] * results.num_rows, pa.int64())
    location.write_parquet(record.results_name, results.append_column(ATTEMPT, attempt))
    span = pc.min_max(results[ROW]).as_py()
    return WrittenResults(span["min"], span["max"],
                          pc.sum(results["_prompt_tokens"]).as_py() or 0,
                          pc.sum(results["_completion_tokens"]).as_py() or 0)


RETRYABLE = ~pc.field("_ok") & pc.field("_retryable")  # a result worth another attempt


@dataclass(frozen=True)
class AttemptOutcome:
    rows: int  # collected
    ok: int
    retry: pa.ChunkedArray  # `_row` of the failures worth another attempt


@dataclass
class RunState:
    job_key: str
    config_hash: str
    dataset_fingerprint: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    provider: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None  # the Prefect flow run that runs it now
    resume: dict[str, str] = field(default_factory=dict)  # cwd and command that resume it
    suspensions: int = 0  # times the run suspended itself to wait (wait_mode suspend)
    token_limit: int | None = None  # the enqueued-token limit a refusal named
    plan_limits: dict[str, int | None] = field(default_factory=dict)  # by attempt
    shards: list[ShardRecord] = field(default_factory=list)
    location: Location | None = field(default=None, repr=False, compare=False)
    lease: Lease | None = field(default=None, repr=False, compare=False)  # held to save
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def load(cls, location: Location) -> RunState | None:
        """The journal at `location` as it is, or None."""
        saved = location.read_json(STATE_FILE)  # raises StorageError naming the file
        if saved is None:
            return None
        records = {(r.attempt, r.shard): r for r in (ShardRecord(**s) for s in saved.pop("shards"))}
        for name in location.list(f"{RESULTS_DIR}/*.json"):  # collected: their final records
            collected = ShardRecord(**location.read_json(f"{RESULTS_DIR}/{name}"))
            records[collected.attempt, collected.shard] = collected  # over a kill's leftover
        shards = sorted(records.values(), key=lambda r: (r.attempt, r.shard))
        return cls(**saved, shards=shards, location=location)

    @classmethod
    def open(cls, location: Location, job_key: str, config_hash: str, fingerprint: str,
             provider: dict[str, Any], force: bool, flow_run_id: str | None = None,
             resume: dict[str, str] | None = None,
             lease: Lease | None = None) -> tuple[RunState, bool]:
        """The journal of this job at `location`, to run it: (state, resumed?). A journal
        of another job (changed config or data), a finished one, or `force`, starts a
        fresh run."""
        saved = cls.load(location)
        if saved and saved.job_key == job_key and not force and not saved.finished:
            saved.lease = lease
            if saved.flow_run_id != flow_run_id:  # started again, not resumed
                location.remove(CANCEL_FILE)
                saved.flow_run_id, saved.resume = flow_run_id, resume or {}
                saved.save()
            return saved, True
        location.remove(CANCEL_FILE)
        state = cls(job_key=job_key, config_hash=config_hash, dataset_fingerprint=fingerprint,
                    provider=provider, flow_run_id=flow_run_id, resume=resume or {},
                    location=location, lease=lease)
        location.remove(RESULTS_DIR)
        state.save()
        return state, False

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def progress(self, attempt: int) -> float:
        """Percent of the attempt's requests that are finished, as the batches report."""
        with self._lock:
            records = [r for r in self.shards if r.attempt == attempt and r.status != "split"]
            total = sum(r.rows for r in records)
            done = sum(r.rows if r.status == "collected" else
                       (r.request_counts or {}).get("completed", 0) +
                       (r.request_counts or {}).get("failed", 0) for r in records)
        return 100.0 * done / total if total else 100.0

    def request_cancel(self) -> None:
        self.location.write_json(CANCEL_FILE, {"run_id": self.run_id,
                                               "flow_run_id": self.flow_run_id,
                                               "requested_at": time.time()})

    def cancel_requested(self) -> bool:
        """Whether this run was asked not to send anything more."""
        request = self.location.read_json(CANCEL_FILE)
        return bool(request) and request.get("run_id") == self.run_id

    def plan_limit(self, attempt: int, limit: int | None) -> int | None:
        """The token limit that `attempt` is planned under: the one it was first planned
        under, so that a resumed run plans the very same shards."""
        with self._lock:
            if str(attempt) not in self.plan_limits:
                self.plan_limits[str(attempt)] = limit
                self.save()
            return self.plan_limits[str(attempt)]

    def learn_token_limit(self, limit: int | None) -> None:
        with self._lock:
            self.token_limit = limit
            self.save()

    def awaited(self) -> list[ShardRecord]:
        """The shards whose batch is created but not yet collected."""
        with self._lock:
            return [r for r in self.shards if r.batch_id and r.status != "collected"]

    def pieces(self, record: ShardRecord) -> list[ShardRecord]:
        """The shards a split shard was cut into."""
        return [r for r in self.shards if r.attempt == record.attempt and
                r.parent == record.shard]

    def next_shard(self, attempt: int) -> int:
        return 1 + max((r.shard for r in self.shards if r.attempt == attempt), default=-1)

    def record(self, attempt: int, shard: int, rows: int, size: int, sha256: str,
               tokens: int = 0, start: int | None = None, parent: int | None = None
               ) -> ShardRecord:
        """The journal entry of a planned shard; the same plan must map to the same entry."""
        with self._lock:
            for existing in self.shards:
                if (existing.attempt, existing.shard) == (attempt, shard):
                    if existing.sha256 != sha256:
                        raise StorageError(
                            f"{self.location.uri}: the saved run planned {existing.name} "
                            "differently (limits changed?); run again with --force")
                    return existing
            record = ShardRecord(attempt, shard, rows, size, sha256, start=start,
                                 parent=parent, tokens=tokens)
            self.shards.append(record)
            self.save()
            return record

    def batch_metadata(self, record: ShardRecord) -> dict[str, str]:
        """What each batch carries, so a run killed just after creating it finds it."""
        return {"enrichflow_job": self.job_key, "enrichflow_run": self.run_id,
                "attempt": str(record.attempt), "shard": str(record.shard),
                "submission": str(record.submission)}

    def intent(self, record: ShardRecord) -> Intent:
        """What finds the batch of `record` again after a kill between its create call
        and its journal write (`BatchAPI.find`)."""

        def custom_ids() -> list[str]:
            requests = self.location.read_parquet(record.requests_name, columns=[CUSTOM_ID])
            return requests[CUSTOM_ID].to_pylist()

        return Intent(self.batch_metadata(record), record.creating_at or self.started_at,
                      record.rows, custom_ids, self._journaled_batches())

    def canary_intent(self) -> Intent:
        """What finds the canary's batch again (only a provider that keeps metadata has
        canary batches: `Job._provider_takes_the_request`)."""
        return Intent(self.canary_metadata(), self.started_at, 0, list,
                      self._journaled_batches())

    def _journaled_batches(self) -> frozenset[str]:
        with self._lock:
            return frozenset(r.batch_id for r in self.shards if r.batch_id)

    @property
    def sync_canary_batch(self) -> str:
        """The `_batch_id` of this run's synchronous canary's answers: the run's own, so
        that its answers kept in the cache are known as this run's (`unfinished_batches`)."""
        return f"{CANARY_BATCH}-{self.run_id}"

    def canary_metadata(self) -> dict[str, str]:
        """What a canary batch carries (no shard's metadata matches it)."""
        return {"enrichflow_canary": self.job_key, "enrichflow_run": self.run_id}

    def upload_name(self, record: ShardRecord) -> str:
        return f"{self.job_key[:12]}-a{record.attempt}-s{record.shard}.jsonl"

    def update(self, record: ShardRecord, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(record, name, value)
            self.save()

    def save_results(self, record: ShardRecord, results: pa.Table) -> None:
        self.mark_collected(record, write_results(self.location, record, results))

    def mark_collected(self, record: ShardRecord, written: WrittenResults) -> None:
        """Journal a shard's results, `written` to `record.results_name`: its final record
        goes beside them, then `run.json` drops it (a kill between the two leaves both,
        and `load` takes the final one)."""
        with self._lock:
            self._check_lease()
            record.status = "collected"
            for name, value in asdict(written).items():
                setattr(record, name, value)
            self.location.write_json(record.record_name, asdict(record))
            self.save()

    def save_canary(self, results: pa.Table, batch_id: str | None) -> None:
        """Journal the canary's results (it passed, or the job was cancelled meanwhile) as
        attempt 1's: its rows are not sent again."""
        record = ShardRecord(1, CANARY_SHARD, results.num_rows, 0, "", batch_id=batch_id)
        with self._lock:
            self.shards.append(record)
        self.save_results(record, results)

    def canary_rows(self) -> pa.Array:
        """The rows the canary answered (or tried): the first attempt does not send them."""
        results = self.canary_results([ROW])
        return pa.array([], pa.int64()) if results is None else results[ROW]

    def canary_results(self, columns: list[str] | None = None) -> pa.Table | None:
        """The journaled answers of the run's canary (`columns` of them); None without."""
        records = [r for r in self.collected(1) if r.canary]
        if not records:
            return None
        return self.location.read_parquet(records[0].results_name, columns=columns)

    def canary_output(self) -> tuple[float, int] | None:
        """The output tokens the canary's usable answers averaged, and how many they are:
        what the run's other answers will likely take. None without a canary."""
        results = self.canary_results(["_ok", "_completion_tokens"])
        usable = None if results is None else results.filter(pc.field("_ok"))
        if not usable:
            return None
        return pc.mean(usable["_completion_tokens"]).as_py(), usable.num_rows

    def remove_results(self) -> None:
        """Drop the collected results, once they are in the written output."""
        self.location.remove(RESULTS_DIR)

    def collected(self, attempt: int | None = None) -> list[ShardRecord]:
        with self._lock:
            return [r for r in self.shards if r.status == "collected" and
                    attempt in (None, r.attempt)]

    def attempt_outcome(self, attempt: int) -> AttemptOutcome:
        """How the rows the attempt collected went, read a shard at a time: every row's
        `_row` at once would be 80 MB at ten million rows."""
        rows, ok, retry = 0, 0, []
        for record in self.collected(attempt):
            results = self.location.read_parquet(record.results_name,
                                                 columns=[ROW, "_ok", "_retryable"])
            rows += results.num_rows
            ok += pc.sum(results["_ok"]).as_py() or 0
            retry.append(results.filter(RETRYABLE)[ROW])
        return AttemptOutcome(rows, ok, pa.chunked_array(retry, pa.int64()))

    def settled_rows(self, attempt: int) -> pa.ChunkedArray:
        """`_row` of the rows the attempt collected that are answered or failed for good."""
        return pa.chunked_array([
            self.location.read_parquet(record.results_name, columns=[ROW],
                                       filters=~RETRYABLE)[ROW]
            for record in self.collected(attempt)], pa.int64())

    def results_for(self, start: int, stop: int,
                    columns: list[str] | None = None) -> pa.Table | None:
        """Every collected result (its `columns`, default all), of every attempt, of rows
        [start, stop); None if none. Only the shards whose rows reach into the range are
        read."""
        wanted = (pc.field(ROW) >= start) & (pc.field(ROW) < stop)
        found = [self.location.read_parquet(r.results_name, columns=columns, filters=wanted)
                 for r in self.collected() if r.first_row is not None and
                 r.first_row < stop and r.last_row >= start]
        found = [table for table in found if table.num_rows]
        return pa.concat_tables(found) if found else None

    @classmethod
    def finish_run(cls, location: Location, run_id: str) -> None:
        """End the journal of run `run_id`, whose output is written, if it is not ended."""
        saved = cls.load(location)
        if saved and saved.run_id == run_id and not saved.finished:
            saved.finish()

    def finish(self) -> None:
        with self._lock:
            self.finished_at = time.time()
            self.save()

    def save(self) -> None:
        """Write `run.json`: the run and its shards not collected."""
        with self._lock:
            self._check_lease()
            data = {k: v for k, v in vars(self).items()
                    if k not in ("location", "lease", "_lock", "shards")}
            data["shards"] = [asdict(s) for s in self.shards if s.status != "collected"]
            self.location.write_json(STATE_FILE, data)

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()  # a run that lost its lease journals (and sends) no more
