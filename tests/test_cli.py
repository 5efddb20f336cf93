"""The `enrichflow` command as a user runs it: run, status, cancel, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from conftest import sdk_client
from test_movies_job import generated_movies, job_file

from enrichflow.cli import main
from localbatch import Simulation

ENRICHFLOW = str(Path(sys.executable).with_name("enrichflow"))


def cli(*args: str, prefect_api: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([ENRICHFLOW, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_run_on_the_embedded_server_then_status(prefect_api, tmp_path, capsys):
    out = tmp_path / "movies"
    done = cli("run", str(Path("configs/movies.yaml").resolve()), "--output", str(out),
               "--limit", "20", prefect_api=prefect_api)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"output:   {out}" in done.stdout and "rows:     20 ok" in done.stdout
    assert "batches:  1, attempts: 1" in done.stdout
    assert (out / "_state" / "localbatch" / "localbatch.sqlite3").exists()
    assert len(pd.read_parquet(out)) == 20

    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "complete: movies wrote 20 rows" in printed and "20 ok" in printed


def test_errors_are_one_clear_line(prefect_api, tmp_path):
    missing = cli("run", "configs/nope.yaml", prefect_api=prefect_api)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: configs/nope.yaml: no such job file"
    assert cli("status", str(tmp_path), prefect_api=prefect_api).returncode == 1


def test_cancel_stops_a_running_job(prefect_api, start_localbatch, tmp_path, capsys):
    server = start_localbatch(Simulation(requests_per_second=10, chunk_size=2))
    path = job_file(tmp_path, generated_movies(200), **{"limits.max_requests_per_shard": 100})
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    run = subprocess.Popen([ENRICHFLOW, "run", str(path), "--base-url", server.base_url],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = tmp_path / "out" / "_state" / "run.json"
    deadline = time.monotonic() + 120
    while not (state_file.exists() and len(json.loads(state_file.read_text())["shards"]) == 2
               and all(s["batch_id"] for s in json.loads(state_file.read_text())["shards"])):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)

    assert main(["cancel", str(tmp_path / "out")]) == 0
    assert "2 batch(es) cancelled" in capsys.readouterr().out
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output[-2000:]
    assert "the job was cancelled" in output

    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 200
    failed = data[data["_status"] == "failed"]
    assert len(failed) > 0 and failed["_error"].str.startswith("batch_cancelled").all()
    assert {b.status for b in sdk_client(server.base_url).batches.list()} == {"cancelled"}
