"""What a job's output and journal say, for `enrichflow status`, `enrichflow.status()`
and the line an interrupted run leaves: complete, or running (its batches), and how to
go on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from enrichflow.config import Job
from enrichflow.errors import ConfigError, StorageError
from enrichflow.provider import answered_by, open_journaled_client
from enrichflow.storage import Location
from enrichflow.tasks.lease import drop_own_lease
from enrichflow.tasks.load import Source
from enrichflow.tasks.state import RunState, ShardRecord
from enrichflow.tasks.write import read_manifest


@dataclass(frozen=True)
class Status:
    output: str
    complete: bool
    lines: list[str]  # what to know, one fact a line
    shards: list[dict[str, Any]] = field(default_factory=list)  # a running run's batches

    def text(self) -> str:
        return "\n".join([*self.lines, *(
            f"  {s['shard']}: {s['rows']:,} rows, {s['status']}, batch {s['batch'] or '-'} "
            f"{s['batch status']} {s['done']}" for s in self.shards)])

    def _repr_html_(self) -> str:
        import html

        import pandas as pd

        facts = "".join(f"<p>{html.escape(line)}</p>" for line in self.lines)
        table = pd.DataFrame(self.shards).to_html(index=False) if self.shards else ""
        return f"<b>{html.escape(self.output)}</b>{facts}{table}"

    def __str__(self) -> str:
        return self.text()


def complete_manifest(location: Location, job_key: str,
                      manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest at `location` (`manifest`, if already read) when the output is
    complete for `job_key` (not cancelled or stopped at the cost cap: the rest of such a
    run is still to send);
    its run's journal is ended too, if a kill after the manifest left it open."""
    done = manifest or read_manifest(location)
    if not done or done.get("job_key") != job_key or done.get("cancelled") \
            or done.get("cost_cap_reached"):
        return None
    RunState.finish_run(location, done["run_id"])
    return done


def already_complete(job: Job) -> dict[str, Any] | None:
    """`complete_manifest` of `job`, told before Prefect starts: from the fingerprint of
    its data's bytes, read only when the output has a manifest at all."""
    location = Location(job.output, job.storage_options)
    manifest = read_manifest(location)
    if manifest is None:
        return None
    fingerprint = Source.open(job.dataset, job.storage_options).fingerprint()
    return complete_manifest(location, job.key(fingerprint), manifest)


def already_complete_line(job: Job, location: Location) -> str:
    return (f"{job.name} is already complete in {location.uri}; nothing sent (use --force "
            "to run it again)")


def run_status(location: Location) -> Status | None:
    """The status of the output at `location`; None when nothing of enrichflow is there."""
    manifest = read_manifest(location)
    state = RunState.load(location)
    if manifest is None and state is None:
        return None
    if manifest and (state is None or state.finished or state.run_id == manifest["run_id"]):
        return Status(location.uri, True, [
            f"complete: {manifest['job']} wrote {manifest['rows']:,} rows at "
            f"{manifest['finished_at']}",
            "rows:     " + ", ".join(f"{n:,} {s}" for s, n in
                                     manifest["rows_by_status"].items()),
            f"tokens:   {manifest['tokens']['prompt']:,} prompt, "
            f"{manifest['tokens']['completion']:,} completion"])
    lines = [f"running or interrupted: run {state.run_id}"
             + (" (cancel requested)" if state.cancel_requested() else "")]
    if state.resume:
        where = "" if state.resume["cwd"] == os.getcwd() else f"cd {state.resume['cwd']} && "
        lines.append(f"resume it: {where}{state.resume['command']}")
    if not state.shards:
        lines.append("  no batch journaled yet: it was preparing, or checking its canary")
    live, silence = _as_the_provider_says(state, location)
    if silence:
        lines.append(f"  the journal's counts: the provider did not answer ({silence})")
    shards = []
    for shard in state.shards:
        counts = shard.request_counts or {}
        status = shard.batch_status or ""
        if shard.batch_id in live:
            status, live_counts = live[shard.batch_id]
            counts = live_counts or counts
        done = counts.get("completed", 0) + counts.get("failed", 0)
        shards.append({"shard": shard.name, "rows": shard.rows, "status": shard.status,
                       "batch": shard.batch_id, "batch status": status,
                       "done": f"{done:,}/{counts.get('total') or shard.rows:,}"})
    return Status(location.uri, False, lines, shards)


def _as_the_provider_says(state: RunState, location: Location
                          ) -> tuple[dict[str, tuple[str, dict | None]], str | None]:
    """The status and request counts of the run's batches not yet collected, as the
    provider sees them now (the journal has them as of the run's last poll); or, when
    it cannot be asked, why."""
    from enrichflow.tasks.api import sdk_errors
    from enrichflow.tasks.wait import look_at_batches

    running = [record.batch_id for record in state.awaited()]
    if not running:
        return {}, None
    try:
        with open_journaled_client(state.provider, location) as client:
            return {batch.id: (client.state_name(batch.status),
                               batch.request_counts.model_dump() if batch.request_counts
                               else None)
                    for batch in look_at_batches(client, running)}, None
    except (*sdk_errors(), ConfigError, StorageError, OSError) as exc:
        return {}, f"{type(exc).__name__}: {exc}"


def what_runs_on(location: Location, job: Job) -> str:
    """One line: what an interrupted run of `job` leaves running at the provider, what it
    may cost, and how to go on. Drops this process's lease, so that the next run, from
    any host, need not find it dead first."""
    drop_own_lease(location)
    state = RunState.load(location)
    if state is None or state.finished:
        return "interrupted: nothing was sent yet"
    resume = state.resume.get("command", "the same command")
    running = state.awaited()
    if not running:
        return (f"interrupted: no batch of this run was running; `{resume}` goes on where "
                "it stopped")
    batches = f"{len(running)} batch(es) ({', '.join(r.batch_id for r in running)})"
    if state.provider.get("local_data_dir"):
        return (f"interrupted: {batches} wait in the embedded local server, stopped with "
                f"this run; `{resume}` goes on with them")
    cost = "" if state.provider["kind"] == "local" else _cost_of(running, job)  # a mock's
    return (f"interrupted: {batches} run on at {answered_by(state.provider)} and are billed "
            f"as they finish{cost}; `{resume}` collects them without paying twice, "
            f"`enrichflow cancel {location.uri}` stops them")


def _cost_of(records: list[ShardRecord], job: Job) -> str:
    """What batches of these shards may cost at batch prices, as an estimate says it."""
    from enrichflow.tasks.estimate import price_for, usd

    price = price_for(job.request.model, job.price)
    tokens = sum(record.tokens for record in records)
    if price is None or not tokens:  # a journal of an older enrichflow has no tokens
        return ""
    ceiling = job.request.output_ceiling()
    high = None if ceiling is None else price.batch_cost(
        tokens, ceiling * sum(record.rows for record in records))
    return (f" (about {usd(price.batch_cost(tokens, 0))} of prompts"
            + (f", up to {usd(high)} with the longest answers)" if high is not None else ")"))
