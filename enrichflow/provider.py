"""Which Batch API a job talks to, and the adapter (`enrichflow.providers`) it uses.

`openai` with `OPENAI_API_KEY` (or a Prefect Secret block); `azure`, Azure OpenAI's v1
API, with `AZURE_OPENAI_API_KEY` (or the block); `anthropic`, Message Batches, with
`ANTHROPIC_API_KEY` (or the block); `gemini`, Gemini's Batch Mode, with `GEMINI_API_KEY`
(or the block); otherwise `local`: a running `enrichflow serve` at
`base_url`, or a local server embedded in the run. The embedded
server keeps its data with a local output (`<output>/_state/localbatch`), so a re-run of
the same job finds the batches of the last one, and `enrichflow cancel` during a run
reaches the run's own server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enrichflow.config import ProviderConfig
from enrichflow.errors import ConfigError
from enrichflow.storage import Location
from localbatch.simulation import AZURE_V1_PATH

if TYPE_CHECKING:  # the SDKs (and the adapters, Prefect) are imported by `open_client`:
    # seconds that a complete job's or a status's answer does without
    from openai import OpenAI

    from enrichflow.providers import BatchAPI

LOCAL_API_KEY_ENV = "LOCALBATCH_API_KEY"
AZURE_KEY_ENV, AZURE_ENDPOINT_ENV = "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT"
ANTHROPIC_KEY_ENV = "ANTHROPIC_API_KEY"
GEMINI_KEY_ENV = "GEMINI_API_KEY"


def provider_kind(provider: ProviderConfig) -> str:
    return provider.kind or ("openai" if os.environ.get("OPENAI_API_KEY") else "local")


def as_reached(provider: ProviderConfig, client: BatchAPI) -> ProviderConfig:
    """The provider as a task in another process reaches it: its kind and the client's
    base URL (an embedded server's too, on loopback); the task finds the key itself."""
    return provider.model_copy(update={"kind": provider_kind(provider),
                                       "base_url": str(client.base_url)})


def describe(provider: ProviderConfig, output: Location) -> dict[str, Any]:
    """What the run journal records of the provider: never a key."""
    kind = provider_kind(provider)
    data_dir = None
    if kind == "local" and not provider.base_url:
        data_dir = str(embedded_data_dir(provider, output))
    base_url = azure_base_url(provider) if kind == "azure" else provider.base_url
    return {"kind": kind, "base_url": base_url, "local_data_dir": data_dir}


def answered_by(described: dict[str, Any]) -> str:
    """Who answers a run, from what `describe` recorded: said at the start of every run
    and in its summary, so that mock answers are never taken for a model's."""
    if described.get("local_data_dir"):
        return ("enrichflow's embedded local server (mock answers: placeholders, and costs "
                "are what OpenAI would charge)")
    if described["kind"] == "local":
        return f"the local Batch API server at {described['base_url']}"
    if described["kind"] == "azure":
        return f"Azure OpenAI at {described['base_url']}"
    if described["kind"] == "anthropic":
        return f"Anthropic at {described['base_url'] or 'https://api.anthropic.com'}"
    if described["kind"] == "gemini":
        return (f"Gemini at "
                f"{described['base_url'] or 'https://generativelanguage.googleapis.com/'}")
    return f"OpenAI at {described['base_url']}" if described.get("base_url") else "OpenAI"


def cost_text(cost_usd: float | None, described: dict[str, Any]) -> str:
    """A run's cost as its summaries say it: a mock server's is what OpenAI would have
    charged, and says so."""
    from enrichflow.tasks.estimate import usd

    if cost_usd is None:
        return "unknown (no price for the model)"
    if described.get("local_data_dir"):
        return f"{usd(cost_usd)} (what OpenAI would charge; nothing was billed)"
    return usd(cost_usd)


def embedded_data_dir(provider: ProviderConfig, output: Location) -> Path:
    if provider.local_data_dir:
        return Path(provider.local_data_dir)
    if output.is_local:
        return Path(output.root) / "_state" / "localbatch"
    return Path.home() / ".cache" / "enrichflow" / "localbatch"


@contextmanager
def open_client(provider: ProviderConfig, output: Location,
                share_running: bool = False) -> Iterator[BatchAPI]:
    """The job's Batch API. An embedded server whose folder a running job serves is
    shared only with `share_running` (`enrichflow cancel`): a run that used another run's
    server would lose it, mid-wait, when that run ends."""
    kind = provider_kind(provider)
    if kind == "anthropic":
        import anthropic  # seconds to import: only for a job on Anthropic

        from enrichflow.providers.anthropic_batches import AnthropicBatches

        yield AnthropicBatches(anthropic.Anthropic(api_key=_api_key(provider, ANTHROPIC_KEY_ENV),
                                                   base_url=provider.base_url), output)
        return
    if kind == "gemini":
        from enrichflow.providers import gemini_batches  # only for a job on Gemini

        yield gemini_batches.GeminiBatches(
            gemini_batches.client(_api_key(provider, GEMINI_KEY_ENV), provider.base_url),
            provider.base_url)
        return
    from enrichflow.providers.openai_batches import OpenAIBatches

    with _openai_client(provider, kind, output, share_running) as client:
        yield OpenAIBatches(client, kind)


@contextmanager
def _openai_client(provider: ProviderConfig, kind: str, output: Location,
                   share_running: bool) -> Iterator[OpenAI]:
    from openai import OpenAI

    if kind == "openai":
        yield OpenAI(api_key=_api_key(provider, "OPENAI_API_KEY"), base_url=provider.base_url)
    elif kind == "azure":
        key = _api_key(provider, AZURE_KEY_ENV)
        yield OpenAI(base_url=azure_base_url(provider), api_key=key,
                     default_headers={"api-key": key})  # Azure's own header for a key
    elif provider.base_url:
        yield OpenAI(base_url=provider.base_url,
                     api_key=os.environ.get(LOCAL_API_KEY_ENV, "localbatch"))
    else:
        from localbatch import URL_FILE, LocalBatchServer

        data_dir = embedded_data_dir(provider, output)
        try:
            server = LocalBatchServer(data_dir)
        except RuntimeError as exc:  # a running job serves that folder
            if not share_running:
                raise ConfigError(f"the embedded local server's folder {data_dir} is in use "
                                  "by another running job; wait for it, or give this job "
                                  "its own provider.local_data_dir") from exc
            yield OpenAI(base_url=(data_dir / URL_FILE).read_text(), api_key="localbatch")
            return
        with server:
            yield OpenAI(base_url=server.base_url, api_key="localbatch")


def open_journaled_client(described: dict[str, Any], output: Location
                          ) -> AbstractContextManager[BatchAPI]:
    """The client of the run whose journal `described` its provider (`describe`), for
    whoever acts on that run from outside it (`enrichflow cancel`, `status`): a running
    job's embedded server is shared."""
    return open_client(ProviderConfig(**described), output, share_running=True)


def azure_base_url(provider: ProviderConfig) -> str:
    """The v1 API of the job's Azure OpenAI resource: `base_url`, else the resource's
    endpoint in AZURE_OPENAI_ENDPOINT (`https://RESOURCE.openai.azure.com`)."""
    if provider.base_url:
        return provider.base_url
    endpoint = os.environ.get(AZURE_ENDPOINT_ENV)
    if not endpoint:
        raise ConfigError(f"provider.kind is azure but neither provider.base_url nor "
                          f"{AZURE_ENDPOINT_ENV} is set; set one to your resource, e.g. "
                          f"https://RESOURCE.openai.azure.com")
    return endpoint.rstrip("/") + AZURE_V1_PATH


def _api_key(provider: ProviderConfig, variable: str) -> str:
    """The key of a paid provider: its Prefect Secret block, else `variable`."""
    if provider.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(provider.api_key_secret).get()
        except ValueError as exc:
            raise ConfigError(f"provider.api_key_secret: no Prefect Secret block named "
                              f"{provider.api_key_secret!r}; create it in the Prefect UI "
                              f"(Blocks > Secret) or set {variable}") from exc
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(f"provider.kind is {provider_kind(provider)} but {variable} is "
                          "not set; export it, or name a Prefect Secret block in "
                          "provider.api_key_secret")
    return key
