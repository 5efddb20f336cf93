"""How the local server imitates the real service: its pace, its limits and its faults.

Loaded from a YAML file (`enrichflow serve --config FAULTS.yaml`) or built in code by
tests and benchmarks. Every field has a default that behaves like a fast, healthy service.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_REQUESTS_PER_BATCH = 50_000
AZURE_MAX_REQUESTS_PER_BATCH = 100_000  # Azure OpenAI's limit a file
AZURE_V1_PATH = "/openai/v1/"  # Azure OpenAI's v1 API: OpenAI's routes under it


class HttpFault(BaseModel):
    """Answer a share of the requests to some routes with an HTTP error instead."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Route prefix, e.g. `/v1/batches` or `/v1/files`.")
    method: str | None = Field(default=None, description="Only this method (GET, POST...).")
    status: int = Field(default=500, ge=400, le=599)
    rate: float = Field(default=0.1, ge=0, le=1, description="Share of matching requests.")
    retry_after: float | None = Field(default=None, ge=0, description="Retry-After seconds.")
    times: int | None = Field(default=None, ge=1, description="Stop after this many faults.")
    lost_response: bool = Field(
        default=False, description="The route does its work (a batch is created), then its "
                                   "answer is lost: the client gets the error instead.")
    delay_seconds: float = Field(default=0.0, ge=0, description="Hold the faulty answer this "
                                                                "long (a client killed meanwhile).")

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return path.startswith(self.path)


class Simulation(BaseModel):
    """Pace, limits and injected faults of a local server."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        default_factory=list, description="Models the mock engine answers for besides "
                                          "OpenAI's own; any other is a 404 model_not_found.")
    requests_per_second: float | None = Field(
        default=None, gt=0, description="Requests per second per batch; unset: no limit."
    )
    tokens_per_second: float | None = Field(
        default=None, gt=0, description="Processing rate in prompt tokens per second per batch."
    )
    validating_seconds: float = Field(default=0.0, ge=0)
    finalizing_seconds: float = Field(default=0.0, ge=0)
    cancelling_seconds: float = Field(default=0.0, ge=0)
    completion_window_seconds: float = Field(
        default=86_400.0, gt=0, description="The `24h` window, scaled down to test expiry."
    )
    request_failure_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of requests that fail inside a batch."
    )
    request_failure_status: int = Field(default=500, ge=400, le=599)
    expire_batches: int = Field(
        default=0, ge=0, description="How many batches (first created first) expire early."
    )
    expire_after_requests: int = Field(
        default=0, ge=0, description="Those batches expire once this many requests ran."
    )
    http_faults: list[HttpFault] = Field(default_factory=list)
    enqueued_token_limits: dict[str, int] = Field(
        default_factory=dict, description="Enqueued prompt-token limit per model."
    )
    default_enqueued_token_limit: int | None = Field(default=None, gt=0)
    max_requests_per_batch: int = Field(default=MAX_REQUESTS_PER_BATCH, gt=0)
    azure_max_requests_per_batch: int = Field(default=AZURE_MAX_REQUESTS_PER_BATCH, gt=0)
    max_file_bytes: int = Field(default=MAX_BATCH_FILE_BYTES, gt=0)
    chunk_size: int = Field(
        default=2000, gt=0, description="Requests run between two saves of a batch's progress."
    )
    seed: int | None = Field(default=None, description="Seed for the fault dice.")
    webhook_url: str | None = Field(
        default=None, description="POST OpenAI's batch webhooks (batch.completed, ...) here "
                                  "when a batch of the OpenAI face ends.")
    webhook_secret: str | None = Field(
        default=None, description="The webhooks' signing secret, `whsec_` and base64, as "
                                  "OpenAI's dashboard gives it (OPENAI_WEBHOOK_SECRET).")

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> Simulation:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("webhook_url needs webhook_secret: OpenAI signs every webhook")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> Simulation:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            return cls.model_validate(raw)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read the simulation config: {exc}") from exc
        except ValidationError as exc:
            raise ValueError(f"{path}: invalid simulation config:\n{exc}") from exc

    def token_limit(self, model: str) -> int | None:
        return self.enqueued_token_limits.get(model, self.default_enqueued_token_limit)


class Dice:
    """The server's source of chance, seeded for reproducible fault runs; thread-safe."""

    def __init__(self, seed: int | None):
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def roll(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._random.random() < rate
