"""OpenAI's Files and Batches APIs through the `openai` SDK: OpenAI, Azure OpenAI (its v1
API) and localbatch's OpenAI face. A batch carries the shard's metadata, by which a run
killed after creating it finds it again."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import openai
import pyarrow as pa
from openai.types import Batch
from prefect import get_run_logger

from enrichflow.providers import JOB_ERRORS, SLACK_SECONDS, BatchAPI, Intent, unknown_model

ERRORS = (openai.APIError,)  # what a call raises (`tasks.api.sdk_errors`)
TRANSIENT = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
             openai.InternalServerError, openai.ConflictError)
LIST_LIMIT = 100  # the most batches one list call returns


class OpenAIBatches(BatchAPI):
    transient = TRANSIENT
    tags_batches = True

    def __init__(self, client: openai.OpenAI, kind: str):
        self.client, self.kind = client, kind
        self.base_url = str(client.base_url)

    def check_model(self, model: str) -> None:
        """A server that lists no models (some OpenAI-compatible ones) cannot tell; nor
        can Azure, whose `model` is a deployment's name, which /models does not list."""
        if self.kind == "azure":
            return
        try:
            self.client.models.retrieve(model)
            return
        except openai.NotFoundError:
            try:
                names = [m.id for m in self.client.models.list()]
            except openai.NotFoundError:
                return
        if not names or model in names:
            return
        raise unknown_model(self.base_url, model, names)

    def upload(self, filename: str, payload: bytes, orphans_since: float | None = None
               ) -> str:
        if orphans_since is not None:  # an upload cut short by a kill, never journaled
            for old in self.client.files.list(purpose="batch", order="desc"):
                if old.created_at < orphans_since - SLACK_SECONDS:
                    break  # newest first: the rest are older than the run
                if old.filename == filename:
                    self.client.files.delete(old.id)
                    get_run_logger().info("deleted %s, an upload of %s that was never "
                                          "journaled", old.id, filename)
        return self.client.files.create(file=(filename, payload), purpose="batch").id

    def create(self, upload_id: str, endpoint: str, metadata: dict[str, str]) -> Batch:
        # the SDK sends no idempotency key: a retried POST could start a second batch
        return self.client.with_options(max_retries=0).batches.create(
            input_file_id=upload_id, endpoint=endpoint, completion_window="24h",
            metadata=metadata)

    def find(self, intent: Intent) -> Batch | None:
        """The newest batch tagged with the intent's metadata (newest first)."""
        for batch in self.client.batches.list(limit=LIST_LIMIT):
            if batch.created_at < intent.since - SLACK_SECONDS:
                return None
            if batch.metadata and all(batch.metadata.get(k) == v
                                      for k, v in intent.metadata.items()):
                return batch
        return None

    def look(self, batch_ids: list[str]) -> list[Batch]:
        """Those among the provider's newest LIST_LIMIT from one list call, any other by
        its own (twenty running shards are one request a poll, under rate limits)."""
        wanted = set(batch_ids)
        listed = {b.id: b for b in self.client.batches.list(limit=LIST_LIMIT).data
                  if b.id in wanted}
        return [listed.get(batch_id) or self.client.batches.retrieve(batch_id)
                for batch_id in batch_ids]

    def cancel(self, batch_id: str) -> bool:
        try:
            self.client.batches.cancel(batch_id)
            return True
        except (openai.BadRequestError, openai.ConflictError):
            return False  # it finished between the look and the cancel

    @contextmanager
    def result_files(self, batch: Batch, custom_ids: pa.Array) -> Iterator[list[str]]:
        with ExitStack() as stack:
            yield [stack.enter_context(self._downloaded(file_id))
                   for file_id in (batch.output_file_id, batch.error_file_id)
                   if file_id]  # a clean batch may report "" as well as null

    def results_kept(self, batch: Batch) -> bool:
        try:
            for file_id in filter(None, (batch.output_file_id, batch.error_file_id)):
                self.client.files.retrieve(file_id)
        except openai.NotFoundError:
            return False
        return True

    def clean_up(self, batch: Batch) -> None:
        for file_id in filter(None, (batch.input_file_id, batch.output_file_id,
                                     batch.error_file_id)):
            try:
                self.client.files.delete(file_id)
            except openai.NotFoundError:
                pass

    def answer_now(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            response = self.client.post(endpoint.removeprefix("/v1"), body=body,
                                        cast_to=httpx.Response)
            return response.status_code, response.json()
        except openai.APIStatusError as exc:
            if exc.status_code in JOB_ERRORS:
                raise
            return exc.status_code, {"error": exc.body}

    @contextmanager
    def _downloaded(self, file_id: str) -> Iterator[str]:
        handle, path = tempfile.mkstemp(suffix=".jsonl")
        os.close(handle)
        try:
            with self.client.files.with_streaming_response.content(file_id) as response:
                response.stream_to_file(path)
            yield path
        finally:
            os.remove(path)
