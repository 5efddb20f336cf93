"""The cost cap (`max_cost_usd`) over what a run has paid, what it has in flight, and
what it has left to send.

The estimate is checked against the cap before anything is uploaded. Each batch is then
checked again before it is created, against what the shards collected so far were really
billed (their usage, journaled) and the most that the batches in flight may cost: an
estimate that counted too few tokens (a provider's own tokenizer, a schema it injects),
or rows that go round again, stop the sending as soon as the bill shows it (the batches
already in flight, estimated alike, may pass the cap by their share). What is not sent
for the cap stays in the output as failed rows that say so, and the run fails once its
output is written: run it again with a higher cap to send them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from enrichflow.config import Job
from enrichflow.errors import CostLimitError
from enrichflow.tasks.estimate import Estimate, Price, usd
from enrichflow.tasks.state import SYNC_PRICED, RunState, ShardRecord

NOT_SENT_FOR_THE_CAP = "not sent: max_cost_usd was reached; raise it and run the job again"


@dataclass(frozen=True)
class CostCap:
    limit: float | None  # the job's max_cost_usd; None: no cap
    price: Price | None
    output_ceiling: int | None  # the output tokens a request may be billed, at most

    @classmethod
    def of(cls, job: Job, price: Price | None) -> CostCap:
        return cls(job.max_cost_usd, price, job.request.output_ceiling())

    def check(self, estimate: Estimate, resumed: RunState | None) -> None:
        """Refuse, before anything is uploaded, a job that may cost more than its cap:
        what it has left to send at most, plus (for a run resumed) what the run paid and
        has in flight. The message is one line; the figures behind it are the estimate
        the run logged just before (and `enrichflow estimate` prints)."""
        if self.limit is None or estimate.requests == 0:
            return
        span = estimate.batch_range()
        if span is None:
            raise CostLimitError(f"max_cost_usd is set but the price of {estimate.model} is "
                                 "unknown; set `price` in the job file")
        if span[1] is None:
            raise CostLimitError("max_cost_usd is set but the output has no ceiling; set "
                                 "request.max_tokens so the cost is bounded")
        committed = 0.0 if resumed is None else self.paid(resumed) + self.in_flight(resumed)
        if committed + span[1] > self.limit:
            before = (f" ({usd(committed)} paid or in flight for the run this one resumes, "
                      f"{usd(span[1])} to send)" if committed else "")
            raise CostLimitError(
                f"this job may cost up to {usd(committed + span[1])}{before} "
                f"({estimate.requests:,} requests), more than max_cost_usd {usd(self.limit)}; "
                "nothing was uploaded. Lower dataset.limit or max_tokens, or raise the cap "
                "(enrichflow estimate shows the figures)")

    def allows(self, state: RunState, record: ShardRecord,
               starting: Iterable[ShardRecord] = (), sync: bool = False) -> bool:
        """Whether the batch of `record` may be created (or, if `sync`, its requests
        answered now) beside the batches in flight and those of `starting`; a batch
        created already is always watched on."""
        if self.limit is None or record.batch_id:
            return True
        new = [r for r in starting if not r.batch_id]
        return self.committed(state, new) + self.at_most(record, sync) <= self.limit

    def reached(self, state: RunState, record: ShardRecord, sync: bool = False) -> str:
        """Why `record`'s batch is not created: the figures of the cap."""
        return (f"max_cost_usd {usd(self.limit)} reached: {usd(self.paid(state))} paid, "
                f"the next shard ({record.rows:,} rows) may cost up to "
                f"{usd(self.at_most(record, sync))}")

    def committed(self, state: RunState, starting: Iterable[ShardRecord] = ()) -> float:
        return self.paid(state) + self.in_flight(state, starting)

    def paid(self, state: RunState) -> float:
        """What the shards collected so far were billed, at their usage."""
        return sum(self._billed(record) for record in state.collected())

    def in_flight(self, state: RunState, starting: Iterable[ShardRecord] = ()) -> float:
        """The most that the batches created and not collected yet (and `starting`) may
        cost: their estimated prompt tokens and the output ceiling of every request."""
        return sum(self.at_most(record) for record in [*state.awaited(), *starting])

    def at_most(self, record: ShardRecord, sync: bool = False) -> float:
        """The most `record`'s requests may cost: at batch prices, or at synchronous
        ones if `sync` (a deadline answers them now)."""
        cost = self.price.sync_cost if sync else self.price.batch_cost
        return cost(record.tokens, record.rows * self.output_ceiling)

    def _billed(self, record: ShardRecord) -> float:
        sync = (record.batch_id or "").startswith(SYNC_PRICED)
        cost = self.price.sync_cost if sync else self.price.batch_cost
        return cost(record.prompt_tokens, record.completion_tokens)
