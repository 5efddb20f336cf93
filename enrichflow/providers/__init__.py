"""The provider layer: one small interface to a Batch API, one adapter per provider.

Everything above it (journal, lease, cache, canary, budget, output) is provider-blind. It
sees a batch as OpenAI's `Batch` model describes one (status, request counts, creation
time) and a batch's results as OpenAI's batch output lines, and each adapter translates
its provider's shapes to and from those: `OpenAIBatches` (OpenAI, Azure OpenAI and
localbatch's OpenAI face), `AnthropicBatches` (Message Batches) and `GeminiBatches`
(Gemini's Batch Mode).
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from enrichflow.errors import ConfigError

if TYPE_CHECKING:  # the openai SDK takes half a second to import: not for `status`
    from openai.types import Batch

SLACK_SECONDS = 300  # clock differences between us and the provider
JOB_ERRORS = (401, 403, 404)  # a wrong key or address: an error of the job, not of a row


@dataclass(frozen=True)
class Intent:
    """What the journal knows of a batch about to be created, by which a run killed
    between the create call and its journal write finds the batch again."""

    metadata: dict[str, str]  # what the batch carries, where a provider keeps metadata
    since: float  # the batch was created after this (less clock slack)
    requests: int  # its request count
    custom_ids: Callable[[], list[str]]  # its requests' custom ids (read if need be)
    known: frozenset[str] = frozenset()  # batches the run journaled: not this one


class BatchAPI(ABC):
    """A provider's Batch API as the flow uses it. A method that talks to the provider
    raises its SDK's errors; `transient` says which of them are worth another try."""

    kind: str  # openai, azure, local, anthropic or gemini
    base_url: str
    transient: tuple[type[Exception], ...]
    tags_batches: bool  # a batch carries the metadata it was created with (`find` by it)
    state_names: dict[str, str] = {}  # the provider's words for our statuses, where they differ

    def state_name(self, status: str) -> str:
        """A batch's status as the provider's own console and docs call it (logs, status)."""
        return self.state_names.get(status, status)

    @abstractmethod
    def check_model(self, model: str) -> None:
        """Refuse (ConfigError) a model the provider does not have, before anything is
        sent, naming the closest one; a provider that cannot tell lets it pass."""

    @abstractmethod
    def upload(self, filename: str, payload: bytes, orphans_since: float | None = None
               ) -> str:
        """Put a shard's requests (OpenAI batch JSONL) where `create` finds them; an id.
        With `orphans_since`, uploads of that name left since then by a killed run go
        first."""

    @abstractmethod
    def create(self, upload_id: str, endpoint: str, metadata: dict[str, str]) -> Batch:
        """Start a batch on an upload, once: never retried here (see submit)."""

    @abstractmethod
    def find(self, intent: Intent) -> Batch | None:
        """The batch created for `intent` before a crash, if there is one."""

    @abstractmethod
    def look(self, batch_ids: list[str]) -> list[Batch]:
        """The batches as they are now, in the order asked, in as few calls as it can."""

    @abstractmethod
    def cancel(self, batch_id: str) -> bool:
        """Ask the provider to cancel a batch; False if it had ended already."""

    @abstractmethod
    def result_files(self, batch: Batch, custom_ids: pa.Array
                     ) -> AbstractContextManager[list[str]]:
        """An ended batch's results as local OpenAI batch output and error files
        (temporary, streamed, never whole in memory). `custom_ids`: its requests'."""

    @abstractmethod
    def results_kept(self, batch: Batch) -> bool:
        """Whether an ended batch's results can still be read."""

    @abstractmethod
    def clean_up(self, batch: Batch) -> None:
        """Delete what a collected batch leaves at the provider; gone already is fine."""

    @abstractmethod
    def answer_now(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One request through the synchronous API (the canary): the HTTP status and
        the answer as OpenAI's endpoint gives it. Errors of the whole job raise."""

    def retrieve(self, batch_id: str) -> Batch:
        (batch,) = self.look([batch_id])
        return batch


def unknown_model(base_url: str, model: str, names: list[str]) -> ConfigError:
    """The error of a model the provider at `base_url` does not have (it has `names`),
    naming the closest one."""
    close = difflib.get_close_matches(model, names, n=1)
    return ConfigError(f"request.model: {base_url} has no model {model!r}"
                       + (f"; did you mean {close[0]!r}?" if close else "")
                       + " Nothing was sent")
