"""The first five minutes' waits: `enrichflow run` of a 10-row job and of a job already
complete, as a user types them (no PREFECT_API_URL, the embedded mock server), medians
of N tries, with the stages of the 10-row run read from its output as it appears:
start-up (imports, pre-flight, the Prefect server's start) to the flow's first log line,
the work to the summary, and shutdown to the exit. Beside them, measured in the same
run: the imports alone, the start of a Prefect server alone, and the baseline, a Prefect
flow of one task that does nothing on a server of its own (the floor any Prefect
entry point pays), and the same 10-row run on a Prefect server started beforehand
(PREFECT_API_URL set); the last column is each figure over that baseline.

    .venv/bin/python bench/startup.py [--tries 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENRICHFLOW = str(Path(sys.executable).with_name("enrichflow"))
IMPORTS = "import enrichflow.cli, enrichflow.flows.enrich"
SERVER = "from enrichflow.local_prefect import own_server_url, set_defaults; " \
         "set_defaults(); own_server_url()"
BARE_FLOW = """
from prefect import flow, task
from enrichflow.local_prefect import on_a_prefect_server, set_defaults
set_defaults()
@task
def nothing(): return None
@flow
def bare(): return nothing()
with on_a_prefect_server():
    bare()
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """(wall seconds, seconds from the start to the first output line that contains
    each marker) of one run of `command`; it must succeed."""
    marks: dict[str, float] = {}
    started = time.monotonic()
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            for marker in ("Beginning flow run", "output:", "already complete"):
                if marker in line and marker not in marks:
                    marks[marker] = time.monotonic() - started
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return wall, marks


@contextmanager
def running_server(env: dict[str, str]) -> Iterator[str]:
    """A Prefect server started beforehand, as a user's `prefect server start`."""
    from enrichflow.local_prefect import _healthy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port), "--no-ui"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        while not _healthy(api):
            time.sleep(0.2)
        yield api
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",
                                                             "PREFECT_API_URL")}
    figures: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        figures.setdefault(name, []).append(seconds)

    with tempfile.TemporaryDirectory() as scratch:
        for attempt in range(args.tries):
            note("baseline: a bare Prefect flow", timed([sys.executable, "-c", BARE_FLOW],
                                                        env)[0])
            note("imports alone", timed([sys.executable, "-c", IMPORTS], env)[0])
            note("a Prefect server's start alone", timed([sys.executable, "-c", SERVER],
                                                         env)[0])
            output = f"{scratch}/out-{attempt}"
            run = [ENRICHFLOW, "run", "configs/movies.yaml", "--limit", "10", "--output",
                   output]
            wall, marks = timed(run, env)
            note("10-row run", wall)
            note("  start-up to the flow's first line", marks["Beginning flow run"])
            note("  work to the summary", marks["output:"] - marks["Beginning flow run"])
            note("  shutdown to the exit", wall - marks["output:"])
            note("already complete", timed(run, env)[0])
            with running_server(env) as api:  # what PREFECT_API_URL to a server saves
                on_it = [*run[:-1], f"{output}-on-a-running-server"]
                note("10-row run, PREFECT_API_URL set", timed(on_it, {
                    **env, "PREFECT_API_URL": api})[0])

    baseline = statistics.median(figures["baseline: a bare Prefect flow"])
    print(f"{'median of ' + str(args.tries):<36} {'seconds':>8} {'/ baseline':>11}")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:<36} {median:>8.2f} {median / baseline:>11.2f}")


if __name__ == "__main__":
    main()
