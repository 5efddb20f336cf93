"""The enqueued-token budget: prompt tokens of unfinished batches stay under the limit.

OpenAI counts the prompt tokens of every batch of a model that is not finished against
an organisation-wide limit, and fails a batch that would pass it at validation. So
shards are planned and started only while they fit under the limit less a margin (the
provider counts a request's tokens a little differently, and more, than our estimate),
and a `token_limit_exceeded` teaches the budget the real limit, which the error names.
This budget is the run's own; runs on one Prefect server share theirs
(`enrichflow.tasks.ledger`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai.types import Batch

    from enrichflow.tasks.state import ShardRecord

_LIMIT = re.compile(r"Limit: ([\d,]+) enqueued tokens")
MARGIN = 0.1


class TokenBudget:
    """The prompt tokens that this run's unfinished batches hold."""

    shared = False  # other runs' batches hold (and give back) tokens of it too

    def __init__(self, limit: int | None):
        self.limit = limit
        self.in_flight = 0

    @property
    def plan_limit(self) -> int | None:
        """The estimated prompt tokens that shards in flight may hold together."""
        return None if self.limit is None else int(self.limit * (1 - MARGIN))

    def take(self, record: ShardRecord) -> bool:
        """Hold the shard's tokens if they fit now (alone, a shard always fits)."""
        fits = self.plan_limit is None or self.in_flight == 0 or \
            self.in_flight + record.tokens <= self.plan_limit
        if fits:
            self.in_flight += record.tokens
        return fits

    def release(self, record: ShardRecord, batch: Batch) -> None:
        """Give back the tokens of a shard whose `batch` ended."""
        self.in_flight -= record.tokens

    def close(self) -> None:
        """The run stops sending (its batches may run on)."""

    def learn(self, message: str) -> int | None:
        """Adopt the limit named in a `token_limit_exceeded` message; returns it."""
        found = _LIMIT.search(message or "")
        if found:
            self.limit = int(found.group(1).replace(",", ""))
        return self.limit if found else None
