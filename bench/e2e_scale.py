"""The movies job end to end at scale: wall time, rows per second, peak memory and disk.

Generates movies tables (data/make_movies.py) and runs the real `enrichflow run` on each,
against the embedded mock server, Prefect start-up included, as a user would; every row
is sent (`--force --no-cache`: a second run in the same folder reuses nothing). Each run's
peak RSS is that of its largest process (the run, which holds the embedded server, or
Prefect's); its peak disk is the most the embedded server's files took at once. Checks
that every row is in the output exactly once and `ok`, then prints the figures of each
size and the ratios of the largest to the smallest (goals at 10,000,000 rows: at most
20 minutes, 1.5 GB in every process, 1.2x the memory of 1,000,000 rows, 3 GB of files).

    .venv/bin/python bench/e2e_scale.py [--rows 100000,1000000] [--work DIR] \
        [--provider local|azure|anthropic|gemini] [--runner threads|dask]

`make bench` runs the default sizes; `make bench SCALE_ROWS=1000000,10000000` the ten
million rows (half an hour or more, 3 GB of CSV in the work folder).

With `--provider azure`, `anthropic` or `gemini` the job talks to that dialect of a localbatch
server of its own (`enrichflow serve`, started here; its memory is not the run's).
With `--runner dask` the per-shard work runs on a Dask LocalCluster of one worker process
a core; the peak RSS is then that of the largest of the run's processes and its workers.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pyarrow.dataset as ds
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data"))
from make_movies import main as make_movies  # noqa: E402

# Runs a command with its output to a file; prints the peak RSS (KiB) of what it ran.
MEASURED = ("import resource, subprocess, sys\n"
            "with open(sys.argv[1], 'w') as log:\n"
            "    code = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(code)\n")


# What a job on each dialect of a served localbatch takes: its flags, its key variable
DIALECTS = {"azure": (["--provider", "azure"], "AZURE_OPENAI_API_KEY", "/openai/v1/"),
            "anthropic": (["--provider", "anthropic", "--model", "claude-haiku-4-5"],
                          "ANTHROPIC_API_KEY", ""),
            "gemini": (["--provider", "gemini", "--model", "gemini-2.5-flash"],
                       "GEMINI_API_KEY", "/gemini")}


def run_job(rows: int, work: Path, flags: list[str],
            env: dict[str, str] | None) -> tuple[float, float, float]:
    """(seconds, peak MiB, peak MiB of the embedded server's files) of one run of the
    movies job over `rows` generated movies."""
    path = job_file(rows, work)
    log = work / f"run-{rows}.log"
    files = work / f"out-{rows}" / "_state" / "localbatch" / "files"
    started = time.perf_counter()
    run = subprocess.Popen([sys.executable, "-c", MEASURED, str(log),
                            str(Path(sys.executable).with_name("enrichflow")), "run",
                            str(path), "--force", "--no-cache", *flags],
                           stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    disk = 0
    while run.poll() is None:
        disk = max(disk, sum(f.stat().st_size for f in files.glob("*") if f.exists()))
        time.sleep(1)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"the run of {rows:,} rows failed; see {log}")
    check_output(work / f"out-{rows}", rows)
    return seconds, int(run.stdout.read().split()[-1]) / 1024, disk / 2**20


def job_file(rows: int, work: Path) -> Path:
    """The movies job over `rows` generated movies (generated once), its output in `work`."""
    data = work / f"movies-{rows}.csv"
    if not data.exists():
        make_movies([str(rows), str(data)])
    job = yaml.safe_load((REPO / "configs" / "movies.yaml").read_text())
    job["dataset"]["path"] = str(data)
    job["output"] = str(work / f"out-{rows}")
    path = work / f"movies-{rows}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def check_output(output: Path, rows: int) -> None:
    table = ds.dataset(output, format="parquet").to_table(columns=["Series_Title", "_status"])
    assert table.num_rows == rows, f"{table.num_rows:,} rows written, not {rows:,}"
    assert pc.count_distinct(table["Series_Title"]).as_py() == rows, "a row is written twice"
    assert pc.all(pc.equal(table["_status"], "ok")).as_py(), "a row is not ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000",
                        help="comma-separated table sizes, smallest first")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the tables and outputs (default: a temporary one)")
    parser.add_argument("--provider", choices=["local", *DIALECTS], default="local",
                        help="local: the run's embedded server; else that dialect of a "
                             "localbatch server started here")
    parser.add_argument("--runner", choices=["threads", "dask"], default="threads",
                        help="where the run's per-shard work runs")
    args = parser.parse_args()
    sizes = [int(size) for size in args.rows.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="enrichflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    with served(args.provider, work) as (provider, env):
        measure(sizes, work, [*provider, "--runner", args.runner], env)
    print(f"tables, outputs and logs are in {work}")


@contextmanager
def served(dialect: str, work: Path) -> Iterator[tuple[list[str], dict[str, str] | None]]:
    """The run's flags and environment for `dialect`, its server up meanwhile."""
    if dialect == "local":
        yield [], None
        return
    flags, key, path = DIALECTS[dialect]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("enrichflow")), "serve",
                               "--port", str(port), "--data-dir", str(work / "localbatch")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                httpx.get(f"{base}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield [*flags, "--base-url", base + path], {**os.environ, key: "bench"}
    finally:
        server.terminate()
        server.wait()


def measure(sizes: list[int], work: Path, flags: list[str],
            env: dict[str, str] | None) -> None:
    figures = {}
    for rows in sizes:
        seconds, peak, disk = run_job(rows, work, flags, env)
        figures[rows] = seconds, peak
        print(f"{rows:>10,} rows: {seconds:7.1f} s wall, {rows / seconds:9,.0f} rows/s, "
              f"peak RSS {peak:7,.0f} MiB, peak files {disk:7,.0f} MiB", flush=True)
    if len(sizes) > 1:
        small, large = figures[sizes[0]], figures[sizes[-1]]
        print(f"{sizes[-1]:,} / {sizes[0]:,} rows: time {large[0] / small[0]:.1f}x, "
              f"memory {large[1] / small[1]:.2f}x (goal at most 1.2x from 1M to 10M)")


if __name__ == "__main__":
    main()
