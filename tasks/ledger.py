"""The organisation's enqueued-token ledger: one Prefect global concurrency limit per
provider account and model, whose slots are prompt tokens, shared by every run, process
and deployment on the same Prefect server.

A provider's enqueued-token limit is per organisation and model (OpenAI's gpt-4o-mini:
2M tokens at tier 1), not per run, so runs that each budget the whole limit for
themselves get their batches refused when they overlap. Here a shard holds its tokens
as a Prefect concurrency lease from before its batch is created until the batch ends;
the lease is journaled with the shard, renewed by the run's process while it waits
(`LeaseKeeper`) and by resume-ready while the run is suspended, and given back when the
batch is collected or cancelled. A lease nobody renews (its run was killed and is not
run again) expires after `LEASE_SECONDS`, and the Prefect server's repossessor gives its
tokens back without a person. The limit shows, and can be changed, on the UI's
Concurrency page (or `prefect gcl update`).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.variables import Variable

from enrichflow.local_prefect import on_a_shared_server
from enrichflow.provider import azure_base_url, provider_kind
from enrichflow.tasks.budget import MARGIN, TokenBudget
from enrichflow.tasks.estimate import price_for, usd
from enrichflow.tasks.report import publish_committed

if TYPE_CHECKING:
    from openai.types import Batch
    from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse

    from enrichflow.config import ProviderConfig
    from enrichflow.tasks.state import RunState, ShardRecord

# Prefect allows 60 s to a day; resume-ready renews a suspended run's leases every pass
# (5 minutes), so a lease outlives two missed passes.
LEASE_SECONDS = float(os.environ.get("ENRICHFLOW_TOKEN_LEASE_SECONDS", 900))
LOCKED, GONE, TOO_MANY_SLOTS = 423, 410, 422
PREFIX = "enqueued-tokens "  # of the ledgers' names
TURNAROUND = "enrichflow_batch_turnaround"  # Prefect variable: ledger -> batches' seconds
KEPT_TURNAROUNDS = 20
PUBLISH_SECONDS = 30  # between two versions of the ledgers' artifact by one run
DEFAULT_HOSTS = {"openai": "api.openai.com", "anthropic": "api.anthropic.com",
                 "gemini": "generativelanguage.googleapis.com"}
logger = logging.getLogger(__name__)  # the keeper's thread is outside the run's context


def open_token_budget(name: str, limit: int | None, chosen: int | None, state: RunState
                      ) -> TokenBudget:
    """The run's enqueued-token budget: the organisation's ledger on a shared Prefect
    server; else the run's own, which does not count the runs beside it (and says so)."""
    if limit is None:
        return TokenBudget(None)
    if not on_a_shared_server():
        get_run_logger().info(
            "enqueued tokens: this run budgets the limit of %s for itself and does not count "
            "runs beside it (no Prefect server is named by PREFECT_API_URL: on one, runs "
            "share the limit)", f"{limit:,}")
        return TokenBudget(limit)
    return SharedTokenBudget.open(name, limit, chosen, state)


def limit_name(kind: str, base_url: str, model: str) -> str:
    """The ledger of a provider account and model: `enqueued-tokens openai
    api.openai.com gpt-4o-mini` (the base URL's host stands for the account)."""
    return f"{PREFIX}{kind} {urlsplit(base_url).netloc or base_url} {model}"


def ledger_of(provider: ProviderConfig, model: str, reached: str | None = None) -> str:
    """The ledger of a job's provider and model; `reached`: the URL its client reached
    (that of a local server embedded in the run, which the job does not name)."""
    kind = provider_kind(provider)
    url = azure_base_url(provider) if kind == "azure" else provider.base_url
    return limit_name(kind, url or (reached if kind == "local" else None)
                      or DEFAULT_HOSTS.get(kind, kind), model)


def queue_now(name: str, default: int) -> tuple[int, int]:
    """(tokens held, the limit) of the ledger `name`, which a run creates with `default`
    tokens."""
    with get_client(sync_client=True) as prefect:
        try:
            ledger = prefect.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return 0, default
    return ledger.active_slots, ledger.limit


def record_turnaround(name: str, seconds: float) -> None:
    """Keep how long a batch of the ledger `name` took, from its creation to its end,
    for the forecasts of later runs (a Prefect variable)."""
    kept = Variable.get(TURNAROUND, default={})
    kept[name] = [*kept.get(name, [])[1 - KEPT_TURNAROUNDS:], round(seconds)]
    Variable.set(TURNAROUND, kept, overwrite=True)


def turnaround(name: str) -> tuple[float, int] | None:
    """The median seconds a batch of the ledger `name` took, and of how many batches."""
    kept = Variable.get(TURNAROUND, default={}).get(name)
    return (statistics.median(kept), len(kept)) if kept else None


def committed() -> list[dict[str, str]]:
    """What the organisation has in its providers' queues, a row per ledger: the
    tokens held of the limit, and what their prompts cost at batch prices."""
    rows = []
    for ledger in _ledgers():
        tokens = int(ledger.active_slots * (1 - MARGIN))  # what the shards estimated
        price = price_for(ledger.name.rsplit(" ", 1)[-1], None)
        rows.append({"ledger": ledger.name.removeprefix(PREFIX),
                     "prompt tokens in unfinished batches": f"{tokens:,}",
                     "limit": f"{ledger.limit:,}",
                     "held": f"{ledger.active_slots / ledger.limit:.0%}",
                     "their prompts at batch prices":
                         usd(price.batch_cost(tokens, 0)) if price else "unknown"})
    return rows


def committed_lines() -> list[str]:
    """`committed` as `enrichflow status` says it, a line per ledger."""
    return [f"{row['ledger']}: {row['prompt tokens in unfinished batches']} prompt tokens in "
            f"unfinished batches, of a limit of {row['limit']} ({row['held']} held)" +
            (f", their prompts {cost} at batch prices"
             if (cost := row["their prompts at batch prices"]) != "unknown" else "")
            for row in committed()]


def slots_of(tokens: int) -> int:
    """What a shard of `tokens` estimated prompt tokens holds: the tokens and the
    budget's margin, so that shards fill the limit only as far as the per-run budget
    plans them (the provider counts a little more than our estimate)."""
    return math.ceil(tokens / (1 - MARGIN))


class SharedTokenBudget(TokenBudget):
    """The enqueued-token budget of a run on a Prefect server: shards take their tokens
    from the organisation's limit `name` and give them back when their batch ends."""

    shared = True

    def __init__(self, name: str, limit: int, state: RunState):
        super().__init__(limit)
        self.name, self.state = name, state
        self.keeper = LeaseKeeper()
        self.waiting = False  # the last take was refused: say so once, not at every try
        self.published = 0.0  # when this run last published the ledgers' artifact

    @classmethod
    def open(cls, name: str, default: int, chosen: int | None, state: RunState
             ) -> SharedTokenBudget:
        """The ledger `name`, created with `default` tokens (the provider's tier limit)
        if it is new; set to `chosen` (the job's `limits.enqueued_token_budget`) if that
        is given; else as it is, as an operator may have changed it."""
        with get_client(sync_client=True) as prefect:
            try:
                prefect.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=chosen or default))
            except (ObjectAlreadyExists, PrefectHTTPStatusError):  # created by another run
                # (on SQLite, a create beside another one may fail with a 500 instead)
                if chosen:
                    prefect.update_global_concurrency_limit(
                        name, GlobalConcurrencyLimitUpdate(limit=chosen))
            limit = prefect.read_global_concurrency_limit_by_name(name)
        get_run_logger().info(
            "enqueued tokens: shared with every run on this Prefect server through its "
            "concurrency limit '%s' (%s tokens, %s held now)", name, f"{limit.limit:,}",
            f"{limit.active_slots:,}")
        return cls(name, limit.limit, state)

    def take(self, record: ShardRecord) -> bool:
        """Hold the shard's tokens; False if the limit has no room for them now. A
        shard whose batch exists (a resumed or re-run run) keeps its journaled lease,
        or takes one, and goes on in any case: its batch is in the provider's queue."""
        lease = self._renewed(record.tokens_lease) or self._taken(record)
        if lease is None and not record.batch_id:
            return False
        if lease is None:
            get_run_logger().warning(
                "%s: its batch %s holds tokens that the limit '%s' has no room for now "
                "(its lease had expired)", record.name, record.batch_id, self.name)
        else:
            self.keeper.hold(lease)
        if record.tokens_lease != lease:
            self.state.update(record, tokens_lease=lease)
            self._publish()
        self.waiting = False
        return True

    def release(self, record: ShardRecord, batch: Batch) -> None:
        """Give the tokens back; a completed batch's turnaround is kept for forecasts."""
        if record.tokens_lease:
            self.keeper.drop(record.tokens_lease)
            release_leases([record])
            record.tokens_lease = None  # journaled with the shard's next change
            self._publish()
        if batch.status == "completed" and batch.completed_at:
            record_turnaround(self.name, batch.completed_at - batch.created_at)

    def learn(self, message: str) -> int | None:
        """A refusal's limit is the organisation's: the ledger takes it too."""
        learned = super().learn(message)
        if learned:
            with get_client(sync_client=True) as prefect:
                prefect.update_global_concurrency_limit(
                    self.name, GlobalConcurrencyLimitUpdate(limit=learned))
        return learned

    def close(self) -> None:
        """Stop renewing: the leases stay, held by the journal until their batches end."""
        self.keeper.stop()
        self._publish(now=True)

    def _publish(self, now: bool = False) -> None:
        """The ledgers' artifact, after a take or a release: at most every
        PUBLISH_SECONDS (each version is a write to the Prefect server's database, which
        every run on it shares), and when the run is done with its batches."""
        if now or time.monotonic() - self.published >= PUBLISH_SECONDS:
            self.published = time.monotonic()
            try:
                publish_committed(committed())
            except Exception as exc:  # a view of the ledgers: the run goes on without it
                logger.warning("the ledgers' artifact was not updated: %s", exc)

    def _renewed(self, lease: str | None) -> str | None:
        return lease if lease and renew_lease(lease) else None

    def _taken(self, record: ShardRecord) -> str | None:
        """A new lease on the shard's tokens, or None while the limit has no room. A
        limit lowered below the shard (on the Concurrency page) is read again, and the
        shard holds all of it."""
        holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(self.state.flow_run_id)) \
            if self.state.flow_run_id else None
        with get_client(sync_client=True) as prefect:
            while True:
                slots = max(1, min(slots_of(record.tokens), self.limit or 1))
                try:
                    return prefect.increment_concurrency_slots_with_lease(
                        [self.name], slots, "concurrency", LEASE_SECONDS, holder
                    ).json()["lease_id"]
                except PrefectHTTPStatusError as exc:
                    status = exc.response.status_code
                    if status not in (LOCKED, TOO_MANY_SLOTS):
                        raise
                    now = prefect.read_global_concurrency_limit_by_name(self.name)
                    if status == TOO_MANY_SLOTS and now.limit != self.limit:
                        self.limit = now.limit
                        continue
                if not self.waiting and not record.batch_id:
                    get_run_logger().info(
                        "%s waits for room for its %s tokens: %s of the %s of '%s' are held "
                        "by running batches", record.name, f"{slots:,}",
                        f"{now.active_slots:,}", f"{now.limit:,}", self.name)
                self.waiting = True
                return None


def _ledgers() -> list[GlobalConcurrencyLimitResponse]:
    """The ledgers on the Prefect server: its global concurrency limits named so."""
    found, page = [], 200
    with get_client(sync_client=True) as prefect:
        while True:
            limits = prefect.read_global_concurrency_limits(page, len(found))
            found += limits
            if len(limits) < page:
                return [limit for limit in found if limit.name.startswith(PREFIX)]


def renew_lease(lease: str) -> bool:
    """Renew a lease for another `LEASE_SECONDS`; False if it is gone (expired)."""
    with get_client(sync_client=True) as prefect:
        try:
            prefect.renew_concurrency_lease(UUID(lease), LEASE_SECONDS)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code in (GONE, 404):
                return False
            raise
    return True


def renew_leases(state: RunState) -> int:
    """Renew the leases of the shards whose batches run (a suspended run holds its
    tokens); how many are still held."""
    return sum(renew_lease(record.tokens_lease) for record in state.awaited()
               if record.tokens_lease)


def release_leases(records: list[ShardRecord]) -> None:
    """Give back the tokens of shards whose batches ended or were cancelled (a lease
    that expired already has nothing to give back, and Prefect says nothing of it)."""
    with get_client(sync_client=True) as prefect:
        for record in records:
            if record.tokens_lease:
                prefect.release_concurrency_slots_with_lease(UUID(record.tokens_lease))


class LeaseKeeper:
    """Renews the leases this process holds while it waits, every third of their life;
    a killed process renews nothing, and its leases expire."""

    def __init__(self) -> None:
        self.leases: set[str] = set()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def hold(self, lease: str) -> None:
        self.leases.add(lease)
        if self.thread is None:
            self.thread = threading.Thread(target=self._renew, name="token leases", daemon=True)
            self.thread.start()

    def drop(self, lease: str) -> None:
        self.leases.discard(lease)

    def stop(self) -> None:
        self.stopped.set()

    def _renew(self) -> None:
        while not self.stopped.wait(LEASE_SECONDS / 3):
            for lease in list(self.leases):
                try:
                    if not renew_lease(lease):
                        self.leases.discard(lease)
                except Exception:  # the server is away for a moment: next time
                    logger.warning("could not renew token lease %s", lease, exc_info=True)
