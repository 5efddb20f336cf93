"""Sending a job's rows: attempts of shards, each shard through render, upload, batch,
wait and collect, under the enqueued-token budget, journaled at every step.

An attempt's shards start while they fit the budget and the cap on shards in flight
(which bounds the files at the provider and the results waiting here), are watched
together by one polling task, and are collected and journaled one by one as their
batches finish. Rows whose request failed, expired or gave an unusable answer go round
again as the next attempt. A shard is a range of the attempt's rows to send (row
numbers, tokens, bytes): its lines are rendered from the dataset when it is uploaded,
and only its results are kept, in `_state/results/`, so memory holds the shards in
flight, not the table.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Literal, NoReturn
from uuid import UUID

import pyarrow as pa
import pyarrow.compute as pc
from openai.types import Batch
from prefect import get_run_logger
from prefect.artifacts import update_progress_artifact
from prefect.flow_runs import suspend_flow_run
from prefect.futures import PrefectFuture

from enrichflow.config import Job, LimitsConfig
from enrichflow.errors import InputError
from enrichflow.provider import as_reached, provider_kind
from enrichflow.providers import BatchAPI
from enrichflow.tasks import watch
from enrichflow.tasks.answer_now import answer_now
from enrichflow.tasks.budget import TokenBudget
from enrichflow.tasks.collect import collect_shard_task
from enrichflow.tasks.estimate import duration, offers_flex
from enrichflow.tasks.events import emit
from enrichflow.tasks.ledger import ledger_of, open_token_budget
from enrichflow.tasks.load import KEY, ROW, RowReader
from enrichflow.tasks.plan import BYTES, TOKENS, Shard, jsonl, plan_shards
from enrichflow.tasks.prepare import Prepared
from enrichflow.tasks.render import CUSTOM_ID, custom_ids, render_requests
from enrichflow.tasks.report import start_progress
from enrichflow.tasks.runner import Runner
from enrichflow.tasks.spend import CostCap
from enrichflow.tasks.state import FLEX_BATCH, NOW_BATCH, RunState, ShardRecord
from enrichflow.tasks.submit import (
    clean_up_task,
    create_batch_task,
    find_batch_task,
    upload_shard_task,
)
from enrichflow.tasks.wait import (
    REPORT_SECONDS,
    TERMINAL,
    check_age,
    look_at_batches_task,
    oldest_start,
    wait_for_batches_task,
)

WaitMode = Literal["poll", "suspend"]
UPLOADS_AT_ONCE = 2  # a shard's lines are held from its render until its upload is done
SUSPEND_MARGIN_SECONDS = 3600  # resume-ready resumes a run past max_wait_hours before this
NOW_ROWS = 100  # rows a deadline answers now between two journal writes


@dataclass(frozen=True)
class Stopped:
    """Why an attempt stopped sending shards before each had its batch."""

    by: Literal["cost cap", "deadline"]
    why: str


def run_attempts(client: BatchAPI, state: RunState, prepared: Prepared, job: Job,
                 runner: Runner, wait_mode: WaitMode, cap: CostCap) -> str | None:
    """Send the rows, then again the ones worth retrying; their results are journaled.
    Once the deadline nears, the rows not answered yet are answered now instead. Why the
    cost cap stopped the sending, if it did."""
    log = get_run_logger()
    limits = job.limits
    cutoff = deadline_cutoff(job)
    ledger = ledger_of(job.provider, job.request.model, str(client.base_url))
    budget = open_token_budget(ledger, state.token_limit or prepared.token_budget,
                               limits.enqueued_token_budget, state)
    progress = start_progress(job.name)
    with closing(RowReader(prepared.source)) as reader, closing(budget):
        lines = ShardLines(prepared, job, reader)
        pending = prepared.to_send
        for attempt in range(1, limits.max_attempts + 1):
            if pending.num_rows == 0:
                break
            if attempt > 1 and state.cancel_requested():
                log.warning("the job was cancelled: %s rows are not sent again",
                            f"{pending.num_rows:,}")
                break
            sending = pending if attempt > 1 else without_rows(pending, state.canary_rows())
            shards = plan_shards(sending, limits.max_requests_per_shard, limits.max_bytes_per_shard,
                                 state.plan_limit(attempt, budget.plan_limit))
            log.info("attempt %d: %s rows in %d shard(s)", attempt, f"{sending.num_rows:,}",
                     len(shards))
            stopped = run_shards(client, state, attempt, sending, shards, budget, cap, job,
                                 wait_mode, progress, lines, runner, cutoff)
            if stopped and stopped.by == "cost cap":
                return stopped.why
            if stopped:
                return answer_rows_now(client, state, attempt + 1,
                                       unanswered(state, attempt, sending), job, lines, cap)
            outcome = state.attempt_outcome(attempt)
            log.info("attempt %d: %s ok, %s failed, %s worth another attempt", attempt,
                     f"{outcome.ok:,}", f"{outcome.rows - outcome.ok:,}",
                     f"{len(outcome.retry):,}")
            pending = pending.filter(pc.is_in(pending[ROW], value_set=outcome.retry))
    return None


def without_rows(requests: pa.Table, rows: pa.Array) -> pa.Table:
    """`requests` less those of `rows` (the canary's, answered already). The canary
    answers the first requests, which are then cut off without a copy: a copy of the
    requests of ten million rows is 240 MB more for the whole of the sending."""
    head = requests[ROW].slice(0, len(rows))
    if len(head) == len(rows) and pc.all(pc.is_in(head, value_set=rows)).as_py():
        return requests.slice(len(rows))
    return requests.filter(pc.invert(pc.is_in(requests[ROW], value_set=rows)))


class ShardLines:
    """The JSONL lines and custom ids of a shard's rows, rendered from the dataset as the
    shard is sent: reading shards in order reads the dataset once."""

    def __init__(self, prepared: Prepared, job: Job, reader: RowReader):
        self.prepared, self.job, self.reader = prepared, job, reader

    def requests(self, rows: pa.Array) -> pa.Table:
        """The rendered requests of `rows`, which prepare found sendable."""
        job = self.job
        rendered = render_requests(self.reader.take(rows), job.request, self.prepared.tag,
                                   job.dataset.path, job.storage_options).requests
        if rendered.num_rows != len(rows):
            raise InputError(f"{job.dataset.path}: {len(rows) - rendered.num_rows} row(s) "
                             "that could be sent when the run was planned render no request "
                             "now (an image that was readable then is not?); run the job "
                             "again")
        return rendered

    def custom_ids(self, rows: pa.Array) -> pa.Array:
        return custom_ids(self.reader.take(rows)[KEY], self.prepared.tag).combine_chunks()

    def save(self, state: RunState, run: ShardRun, ids: pa.Array | None = None) -> None:
        """Write the shard's requests file (rows, custom ids), which collecting it reads;
        a shard journaled by an older run without it gets it here."""
        if ids is None and state.location.exists(run.record.requests_name):
            return
        ids = self.custom_ids(run.rows) if ids is None else ids
        state.location.write_parquet(run.record.requests_name,
                                     pa.table({ROW: run.rows, CUSTOM_ID: ids}))


@dataclass
class ShardRun:
    """One shard of an attempt on its way through upload, batch, wait and collect."""

    shard: Shard
    record: ShardRecord
    rows: pa.Array  # its row numbers

    @classmethod
    def of(cls, state: RunState, attempt: int, pending: pa.Table, shard: Shard,
           parent: int | None = None) -> ShardRun:
        """The shard with its journal entry, which its plan must match (a resumed run
        plans the very same shards)."""
        part = pending.slice(shard.start, shard.rows)
        sizes = part[BYTES].cast(pa.int64())  # as journaled when sizes were held in 64 bits
        plan = hashlib.sha256(part[ROW].to_numpy().tobytes() + sizes.to_numpy().tobytes())
        record = state.record(attempt, shard.index, shard.rows, shard.bytes, plan.hexdigest(),
                              shard.tokens, start=None if parent is None else shard.start,
                              parent=parent)
        rows = part[ROW]  # a view when it can: the queue holds every shard's rows
        return cls(shard, record, rows.chunk(0) if rows.num_chunks == 1 else
                   rows.combine_chunks())


def run_shards(client: BatchAPI, state: RunState, attempt: int, pending: pa.Table,
               shards: list[Shard], budget: TokenBudget, cap: CostCap, job: Job,
               wait_mode: WaitMode, progress: UUID, lines: ShardLines, runner: Runner,
               cutoff: float | None = None) -> Stopped | None:
    """Run one attempt's shards, starting each only when it fits the cost cap, the
    enqueued-token budget (on a Prefect server, the organisation's: room that other runs
    give back is looked for at each poll) and fewer than `max_shards_in_flight` run, and
    collect (and journal) each as soon as its batch is finished: the collects are tasks
    on the job's runner, each writing its shard's results. A shard refused for
    `token_limit_exceeded` is cut into smaller shards under the limit the refusal named
    (or, refused alone, into halves), or waits for running batches and goes again; a
    refusal is never one of its rows' attempts. In `suspend` mode the run, rather than
    waiting, suspends itself until the resume-ready deployment finds a batch of it
    finished. After a cancel, no shard is started: their rows have no result, which the
    output shows as cancelled. When the next shard does not fit the cost cap with nothing
    in flight, none is started. At the deadline's `cutoff` (or a batch's window's), no
    shard is started and the batches running are cancelled and collected (their answers
    are kept). Either way, why is returned."""
    log = get_run_logger()
    limits = job.limits
    queue: deque[ShardRun] = deque()
    for shard in shards:
        queue.extend(_still_to_run(state, attempt, pending, shard))
    running: dict[str, ShardRun] = {}  # by batch id
    windows: dict[str, float] = {}  # by batch id: when its window ends, less the lead
    cut = False
    while queue or running:
        if cutoff is not None and not cut and \
                time.time() >= min([cutoff, *windows.values()]):
            cut = True
            take_out_of_batches(client, job, queue, running, budget)
        if any(not run.record.batch_id for run in queue) and state.cancel_requested():
            unsent = [run for run in queue if not run.record.batch_id]
            log.warning("the job was cancelled: %d shard(s) of attempt %d are not sent",
                        len(unsent), attempt)
            queue = deque(run for run in queue if run.record.batch_id)  # re-attach to these
        starting: list[ShardRun] = []
        while (queue and len(running) + len(starting) < limits.max_shards_in_flight
               and cap.allows(state, queue[0].record, [run.record for run in starting])
               and budget.take(queue[0].record)):
            starting.append(queue.popleft())
        capped = bool(queue) and not cap.allows(state, queue[0].record,
                                                [run.record for run in starting])
        if capped and not running and not starting:  # what is paid leaves no room for it
            reason = cap.reached(state, queue[0].record)
            log.warning("%s; %d shard(s) of attempt %d are not sent", reason, len(queue),
                        attempt)
            return Stopped("cost cap", reason)
        # no room in a shared budget now: room that other runs give back is looked for again
        waiting_for_tokens = budget.shared and bool(queue) and not capped and \
            len(running) + len(starting) < limits.max_shards_in_flight
        start_shards(client, state, starting, lines, job)
        if waiting_for_tokens:  # the next shard goes up meanwhile: room, when it comes,
            upload_shards(client, state, [queue[0]], lines)  # needs only its batch created
        running.update({run.record.batch_id: run for run in starting})
        if not running:
            if waiting_for_tokens:
                time.sleep(limits.poll_interval_max)
            continue
        if wait_mode == "suspend":
            batches = look_at_batches_task(client, list(running))
        else:
            report = limits.poll_interval_max if waiting_for_tokens else REPORT_SECONDS
            if cutoff is not None and not cut:  # back in time to act on the deadline
                report = max(limits.poll_interval_min,
                             min(report, min([cutoff, *windows.values()]) - time.time()))
            batches = wait_for_batches_task(
                client, list(running), limits.poll_interval_min, limits.poll_interval_max,
                limits.max_wait_hours, report)
        for batch in batches:
            if batch.expires_at:
                windows[batch.id] = batch.expires_at - limits.deadline_lead_seconds
            counts = batch.request_counts
            state.update(running[batch.id].record, batch_status=client.state_name(batch.status),
                         request_counts=counts.model_dump() if counts else None)
        update_progress_artifact(progress, state.progress(attempt))
        finished = [batch for batch in batches if batch.status in TERMINAL]
        if not finished and wait_mode == "suspend":
            suspend(state, batches, limits.max_wait_hours,
                    ", ".join(r.name for r in state.awaited()))
        to_collect: list[tuple[ShardRun, Batch]] = []
        for batch in finished:
            run = running.pop(batch.id)
            windows.pop(batch.id, None)
            emit(f"batch.{batch.status}", job.name, state.location.uri, batch=batch.id,
                 shard=run.record.name, request_counts=run.record.request_counts)
            budget.release(run.record, batch)
            refusal = _token_limit_refusal(batch)
            if refusal:
                again = _after_refusal(state, attempt, pending, run, batch, refusal, budget,
                                       limits, others_running=bool(running))
                if again:
                    queue.extendleft(reversed(again))
                    continue
            to_collect.append((run, batch))
        collect_shards(client, state, to_collect, job, lines, runner)
    return Stopped("deadline", "the deadline nears") if cut else None


def deadline_cutoff(job: Job) -> float | None:
    """When the rows not answered yet go through the synchronous API: the job's deadline
    less its lead; None without a deadline."""
    if job.deadline is None:
        return None
    return job.deadline.timestamp() - job.limits.deadline_lead_seconds


def take_out_of_batches(client: BatchAPI, job: Job, queue: deque[ShardRun],
                        running: dict[str, ShardRun], budget: TokenBudget) -> None:
    """At the deadline's cutoff: cancel the batches running (a re-attached one too),
    whose answers so far are collected as they end, and start no other shard."""
    for run in [run for run in queue if run.record.batch_id]:
        budget.take(run.record)  # a batch created already always goes on
        running[run.record.batch_id] = run
    unsent = sum(1 for run in queue if not run.record.batch_id)
    queue.clear()
    for batch_id in running:
        client.cancel(batch_id)
    get_run_logger().warning(
        "the deadline %s is less than %s away: %d batch(es) cancelled (the answers they "
        "have are kept), %d shard(s) not sent; the rows not answered go through the "
        "synchronous API", job.deadline.isoformat(timespec="seconds"),
        duration(job.limits.deadline_lead_seconds), len(running), unsent)


def unanswered(state: RunState, attempt: int, sending: pa.Table) -> pa.Table:
    """The requests of `sending` without an answer or a final failure in the attempt or
    in the answers the deadline got (the next attempt, by a run resumed after it)."""
    settled = pa.chunked_array([*state.settled_rows(attempt).chunks,
                                *state.settled_rows(attempt + 1).chunks], pa.int64())
    return sending.filter(pc.invert(pc.is_in(sending[ROW], value_set=settled)))


def answer_rows_now(client: BatchAPI, state: RunState, attempt: int, requests: pa.Table,
                    job: Job, lines: ShardLines, cap: CostCap) -> str | None:
    """The rows a deadline took out of their batches, answered through the synchronous
    API: OpenAI's flex tier where the model offers it (at batch prices), else the
    standard one; NOW_ROWS at a time, each journaled as a shard of `attempt`, within
    the cost cap. Why the cost cap stopped them, if it did."""
    if not requests.num_rows:
        return None
    log = get_run_logger()
    flex = provider_kind(job.provider) in ("openai", "local") and offers_flex(job.request.model)
    tier, prefix = ("flex", FLEX_BATCH) if flex else (None, NOW_BATCH)
    log.warning("%s row(s) not answered go through the synchronous API, %s",
                f"{requests.num_rows:,}", "in OpenAI's flex tier at batch prices" if flex
                else "at synchronous prices")
    for shard in plan_shards(requests, NOW_ROWS, job.limits.max_bytes_per_shard, None):
        run = ShardRun.of(state, attempt, requests, replace(shard,
                                                            index=state.next_shard(attempt)))
        if not cap.allows(state, run.record, sync=not flex):
            reason = cap.reached(state, run.record, sync=not flex)
            log.warning("%s; the rows left are not answered", reason)
            return reason
        run.record.batch_id = f"{prefix}-{state.run_id}-{run.record.shard}"
        results = answer_now(client, lines.requests(run.rows), job.request,
                             run.record.batch_id, tier)
        state.save_results(run.record, results)
        watch.answered(results.num_rows)
    log.info("%s row(s) answered through the synchronous API", f"{requests.num_rows:,}")
    return None


def collect_shards(client: BatchAPI, state: RunState, finished: list[tuple[ShardRun, Batch]],
                   job: Job, lines: ShardLines, runner: Runner) -> None:
    """Collect finished shards on the runner, then journal each, then delete its files."""
    log = get_run_logger()
    provider = as_reached(job.provider, client)
    for run, _ in finished:
        lines.save(state, run)
    collected = runner.map(collect_shard_task, [
        {"provider": provider, "location": state.location, "batch": batch,
         "record": run.record, "request": job.request} for run, batch in finished])
    for (run, batch), shard in zip(finished, collected, strict=True):
        state.mark_collected(run.record, shard.written)
        log.info("%s: batch %s is %s; collected %s ok, %s failed", run.record.name,
                 batch.id, batch.status, f"{shard.ok:,}", f"{shard.failed:,}")
        if shard.foreign:
            log.warning("%s: batch %s holds none of its requests (another client's, taken "
                        "for it after a crash): left alone; its rows go round again",
                        run.record.name, batch.id)
        elif job.cleanup:
            clean_up_task(client, batch)


def start_shards(client: BatchAPI, state: RunState, starting: list[ShardRun],
                 lines: ShardLines, job: Job) -> None:
    """Give each shard of `starting` its batch, exactly once: re-attach to a journaled
    batch or to one created just before a crash (`BatchAPI.find`), else upload and
    create, concurrently (creates one at a time on a provider whose batches carry no
    metadata, so that a crash leaves at most one batch to find). The tasks get and
    return values; the flow journals before and after each side effect."""
    log = get_run_logger()
    for run in starting:
        record = run.record
        if record.batch_id:
            log.info("%s: re-attaching to batch %s", record.name, record.batch_id)
        elif record.status == "creating":
            found = find_batch_task(client, state.intent(record))
            if found:
                log.info("%s: found batch %s created before a crash", record.name, found.id)
                state.update(record, batch_id=found.id, status="submitted")
    upload_shards(client, state, starting, lines)
    creates: deque[tuple[ShardRun, PrefectFuture]] = deque()
    for run in starting:
        record = run.record
        if not record.batch_id:
            if creates and not client.tags_batches:  # one unjournaled batch at a time
                _created(state, job, *creates.popleft())
            state.update(record, status="creating", creating_at=time.time())
            creates.append((run, create_batch_task.submit(
                client, record.file_id, job.request.endpoint, state.intent(record))))
    while creates:
        _created(state, job, *creates.popleft())


def upload_shards(client: BatchAPI, state: RunState, runs: list[ShardRun],
                  lines: ShardLines) -> None:
    """Render and upload the input file of each shard of `runs` that has none yet,
    `UPLOADS_AT_ONCE` at a time, journaled before and after."""
    uploads: deque[tuple[ShardRun, PrefectFuture]] = deque()
    for run in runs:
        record = run.record
        if not record.batch_id and not record.file_id:
            if len(uploads) == UPLOADS_AT_ONCE:
                _uploaded(state, *uploads.popleft())
            orphans_since = state.started_at if record.status == "uploading" else None
            requests = lines.requests(run.rows)  # rendered here: only shards going up hold lines
            lines.save(state, run, requests[CUSTOM_ID].combine_chunks())
            state.update(record, status="uploading")
            uploads.append((run, upload_shard_task.submit(
                client, state.upload_name(record), jsonl(requests), orphans_since)))
    while uploads:
        _uploaded(state, *uploads.popleft())


def _created(state: RunState, job: Job, run: ShardRun, created: PrefectFuture) -> None:
    batch = created.result()
    state.update(run.record, batch_id=batch.id, status="submitted", batch_status=batch.status)
    get_run_logger().info("%s: created batch %s", run.record.name, batch.id)
    emit("batch.created", job.name, state.location.uri, batch=batch.id,
         shard=run.record.name, rows=run.record.rows)


def _uploaded(state: RunState, run: ShardRun, upload: PrefectFuture) -> None:
    state.update(run.record, file_id=upload.result(), status="uploaded")
    get_run_logger().info("%s: uploaded %s rows (%s bytes) as %s", run.record.name,
                          f"{run.record.rows:,}", f"{run.record.bytes:,}", run.record.file_id)


def _after_refusal(state: RunState, attempt: int, pending: pa.Table, run: ShardRun,
                   batch: Batch, refusal: str, budget: TokenBudget, limits: LimitsConfig,
                   others_running: bool) -> list[ShardRun]:
    """What goes again after a `token_limit_exceeded`: the shard cut into shards under
    the limit the refusal named (or in halves, if it was refused alone although it fits:
    the provider counts more than our estimate), or the shard itself once running
    batches are done; nothing when a single row was refused alone (it fails)."""
    log = get_run_logger()
    state.learn_token_limit(budget.learn(refusal) or budget.limit)
    cap = budget.plan_limit
    too_big = cap is not None and run.shard.tokens > cap
    if run.shard.rows > 1 and (too_big or not others_running):
        pieces = _split(state, attempt, pending, run,
                        cap if too_big else run.shard.tokens // 2, limits)
        log.warning("%s: batch %s refused (token_limit_exceeded, limit %s): its rows go on "
                    "as %d smaller shards", run.record.name, batch.id,
                    f"{budget.limit:,}" if budget.limit else "unknown", len(pieces))
        return pieces
    if others_running:
        log.warning("%s: batch %s refused (token_limit_exceeded); it waits for running "
                    "batches and goes again", run.record.name, batch.id)
        state.update(run.record, batch_id=None, status="uploaded",
                     submission=run.record.submission + 1)
        return [run]
    return []


def _still_to_run(state: RunState, attempt: int, pending: pa.Table,
                  shard: Shard) -> list[ShardRun]:
    """What a planned shard still needs: nothing if collected, the pieces it was cut
    into if it was split, else itself."""
    run = ShardRun.of(state, attempt, pending, shard)
    if run.record.status == "collected":
        return []
    if run.record.status == "split":
        return [again for piece in state.pieces(run.record)
                for again in _still_to_run(state, attempt, pending, _shard_of(pending, piece))]
    return [run]


def _shard_of(pending: pa.Table, piece: ShardRecord) -> Shard:
    tokens = pc.sum(pending[TOKENS].slice(piece.start, piece.rows)).as_py() or 0
    return Shard(piece.shard, piece.start, piece.start + piece.rows, piece.bytes, tokens)


def _split(state: RunState, attempt: int, pending: pa.Table, run: ShardRun, cap: int,
           limits: LimitsConfig) -> list[ShardRun]:
    """Cut a refused shard into shards of at most `cap` estimated tokens, journaled
    before the refused one is marked split, so a kill in between loses no row."""
    part = pending.slice(run.shard.start, run.shard.rows)
    cap = max(cap, pc.max(part[TOKENS]).as_py())  # a row is never cut
    first = state.next_shard(attempt)
    runs = [ShardRun.of(state, attempt, pending,
                        Shard(first + i, run.shard.start + cut.start,
                              run.shard.start + cut.end, cut.bytes, cut.tokens),
                        parent=run.record.shard)
            for i, cut in enumerate(plan_shards(part, limits.max_requests_per_shard,
                                                limits.max_bytes_per_shard, cap))]
    state.update(run.record, status="split", batch_id=None)
    return runs


def suspend(state: RunState, batches: list[Batch], max_wait_hours: float,
            awaited: str) -> NoReturn:
    """Suspend the run while `batches` (`awaited`, by name) run (suspend mode): the
    process exits, the worker is free; a resumed run starts over from the journal, so
    nothing is submitted twice. Batches past `max_wait_hours` end the run as in poll
    mode, saying that they run on; Prefect's own timeout, an hour later, is only the
    fallback for a run that resume-ready did not resume by then."""
    check_age(batches, max_wait_hours)
    left = oldest_start(batches) + max_wait_hours * 3600 - time.time()
    state.suspensions += 1
    state.save()
    get_run_logger().info("waiting for %s: suspending the run, which frees the worker; the "
                          "resume-ready deployment resumes it when one of them is finished",
                          awaited)
    suspend_flow_run(key=f"{state.run_id}-wait-{state.suspensions}",
                     timeout=int(left + SUSPEND_MARGIN_SECONDS))
    raise AssertionError("unreachable: suspend_flow_run ends the run")


def _token_limit_refusal(batch: Batch) -> str | None:
    if batch.status != "failed" or not batch.errors or not batch.errors.data:
        return None
    error = batch.errors.data[0]
    return error.message if error.code == "token_limit_exceeded" else None
