"""Which Batch API a job talks to, and the one OpenAI client it uses for it.

`openai` with `OPENAI_API_KEY` (or a Prefect Secret block); otherwise `local`: a running
`enrichflow serve` at `base_url`, or a local server embedded in the run. The embedded
server keeps its data with a local output (`<output>/_state/localbatch`), so a re-run of
the same job finds the batches of the last one, and `enrichflow cancel` during a run
reaches the run's own server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from openai import OpenAI

from enrichflow.config import ProviderConfig
from enrichflow.errors import ConfigError
from enrichflow.storage import Location
from localbatch import URL_FILE, LocalBatchServer

LOCAL_API_KEY_ENV = "LOCALBATCH_API_KEY"


def provider_kind(provider: ProviderConfig) -> str:
    return provider.kind or ("openai" if os.environ.get("OPENAI_API_KEY") else "local")


def as_reached(provider: ProviderConfig, client: OpenAI) -> ProviderConfig:
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
    return {"kind": kind, "base_url": provider.base_url, "local_data_dir": data_dir}


def embedded_data_dir(provider: ProviderConfig, output: Location) -> Path:
    if provider.local_data_dir:
        return Path(provider.local_data_dir)
    if output.is_local:
        return Path(output.root) / "_state" / "localbatch"
    return Path.home() / ".cache" / "enrichflow" / "localbatch"


@contextmanager
def open_client(provider: ProviderConfig, output: Location,
                share_running: bool = False) -> Iterator[OpenAI]:
    """The job's client. An embedded server whose folder a running job serves is shared
    only with `share_running` (`enrichflow cancel`): a run that used another run's server
    would lose it, mid-wait, when that run ends."""
    kind = provider_kind(provider)
    if kind == "openai":
        yield OpenAI(api_key=_openai_key(provider), base_url=provider.base_url)
    elif provider.base_url:
        yield OpenAI(base_url=provider.base_url,
                     api_key=os.environ.get(LOCAL_API_KEY_ENV, "localbatch"))
    else:
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


def _openai_key(provider: ProviderConfig) -> str:
    if provider.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(provider.api_key_secret).get()
        except ValueError as exc:
            raise ConfigError(f"provider.api_key_secret: no Prefect Secret block named "
                              f"{provider.api_key_secret!r}; create it in the Prefect UI "
                              "(Blocks > Secret) or set OPENAI_API_KEY") from exc
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise ConfigError("provider.kind is openai but OPENAI_API_KEY is not set; export "
                          "it, or name a Prefect Secret block in provider.api_key_secret")
    return key
