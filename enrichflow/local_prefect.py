"""The Prefect server that the entry points (the CLI, the Python API) run on when no
server is named by PREFECT_API_URL: one of our own, started as Prefect starts its
temporary server, but in its own session and with its output kept, so that a Ctrl-C in
a terminal or the interrupt of a Jupyter kernel (both sent to the whole process group)
neither stops it mid-run nor prints its tracebacks over the run's one line."""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import IO, Any

import httpx

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network on our machines
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # first start can be slow
}
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_server: _OwnServer | None = None  # this process's own server


def set_defaults() -> None:
    """Our defaults for the settings the user has not set."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def on_a_prefect_server() -> AbstractContextManager[Any]:
    """Runs in this block go to the server PREFECT_API_URL names, else to this
    process's own (`own_server_url`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: own_server_url()})


def on_a_shared_server() -> bool:
    """Whether runs here go to a Prefect server that other processes' runs use too (one
    that PREFECT_API_URL names), not to this process's own or a temporary one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return bool(url) and (_server is None or url != _server.url)


def start_own_server() -> None:
    """Start this process's own Prefect server, unless PREFECT_API_URL names one or it
    runs already, without waiting for it: it starts while the caller goes on (the
    pre-flight, the imports), and `own_server_url` waits for what is left."""
    if not os.environ.get("PREFECT_API_URL") and not _running():
        _spawn()


def own_server_url() -> str:
    """The API URL of this process's own Prefect server, started on first use (as
    Prefect's temporary server is: loopback, no UI, no scheduler, the database under
    PREFECT_HOME) and again if it died; stopped when this process ends. Prefect's
    temporary server would be stopped by an interrupt mid-run, and the engine would then
    retry reporting the run's end for minutes and lose the interrupt."""
    if not _running():
        _spawn()
    server = _server
    timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    while not server.healthy and not _healthy(server.url):
        if server.process.poll() is not None or \
                time.monotonic() > server.started + timeout:
            server.process.kill()
            server.output.seek(0)
            raise RuntimeError(f"a local Prefect server did not start within {timeout:g} s "
                               f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): "
                               f"{server.output.read().decode()[-2000:]}")
        time.sleep(0.2)
    server.healthy = True
    return server.url


def _running() -> bool:
    return _server is not None and _server.process.poll() is None


def _spawn() -> None:
    global _server
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tempfile.TemporaryFile()  # never a pipe: a full one would block the server
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--no-ui", "--no-services"],
        stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_die_with_parent)
    atexit.register(process.terminate)
    _server = _OwnServer(process, f"http://127.0.0.1:{port}/api", output, time.monotonic())


@dataclass
class _OwnServer:
    process: subprocess.Popen
    url: str
    output: IO[bytes]  # what it printed, for the error if it does not start
    started: float  # time.monotonic() at its start
    healthy: bool = False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _die_with_parent() -> None:
    """In the server's process: end when the process that started it ends, even killed
    (Linux); elsewhere it ends with that process's normal exit."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
