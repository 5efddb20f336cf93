"""The `enrichflow` command as a user runs it: run, status, cancel, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import generated_movies, job_file, sdk_client, start_job, wait_for_batches

from enrichflow.cli import main
from localbatch import Simulation

ENRICHFLOW = str(Path(sys.executable).with_name("enrichflow"))


def cli(*args: str, prefect_api: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `enrichflow ARGS` run as a user would."""
    run = start_job([ENRICHFLOW, *args], prefect_api, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    stdout, stderr = run.communicate(timeout=300)
    return run.returncode, stdout, stderr


def test_run_on_the_embedded_server_then_status(prefect_api, tmp_path, capsys):
    out = tmp_path / "movies"
    code, stdout, stderr = cli("run", "configs/movies.yaml", "--output", str(out),
                               "--limit", "20", prefect_api=prefect_api)
    assert code == 0, stderr[-2000:]
    assert f"output:   {out}" in stdout and "rows:     20 ok" in stdout
    assert "batches:  1, attempts: 1" in stdout
    assert (out / "_state" / "localbatch" / "localbatch.sqlite3").exists()
    assert len(pd.read_parquet(out)) == 20

    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "complete: movies wrote 20 rows" in printed and "20 ok" in printed

    # killed after the manifest, before the journal's end: still complete, and a re-run
    # ends the journal instead of leaving the run "interrupted" for ever
    journal = out / "_state" / "run.json"
    journal.write_text(json.dumps({**json.loads(journal.read_text()), "finished_at": None}))
    assert main(["status", str(out)]) == 0
    assert "complete: movies wrote 20 rows" in capsys.readouterr().out
    code, stdout, stderr = cli("run", "configs/movies.yaml", "--output", str(out),
                               "--limit", "20", prefect_api=prefect_api)
    assert code == 0 and "already complete" in stdout + stderr
    assert json.loads(journal.read_text())["finished_at"] is not None


def test_errors_are_one_clear_line(prefect_api, tmp_path):
    code, _, stderr = cli("run", "configs/nope.yaml", prefect_api=prefect_api)
    assert code == 2 and stderr.strip() == "error: configs/nope.yaml: no such job file"
    assert cli("status", str(tmp_path), prefect_api=prefect_api)[0] == 1
    code, _, stderr = cli("run", "configs/movies.yaml", "--limit", "0", prefect_api=prefect_api)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        "enrichflow run: error: argument --limit: must be a positive number of rows, not 0")


def test_an_error_inside_the_flow_is_one_line_without_tracebacks(prefect_api, tmp_path):
    """Found in the flow's first task: Prefect logs it, but not its traceback."""
    path = job_file(tmp_path, **{"dataset.path": "data/missing.csv"})
    code, stdout, stderr = cli("run", str(path), prefect_api=prefect_api)
    assert code == 2
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1].startswith(
        "error: dataset.path: data/missing.csv does not exist; check the path (relative "
        "paths start from the directory you run in, ")
    code, stdout, stderr = cli("--verbose", "run", str(path), prefect_api=prefect_api)
    assert code == 1 and "Traceback" in stderr


def test_a_provider_error_names_the_call_the_status_and_the_fix(prefect_api, start_localbatch,
                                                                tmp_path):
    server = start_localbatch(api_key="sk-the-right-one")
    code, stdout, stderr = cli("run", "configs/movies.yaml", "--output", str(tmp_path / "out"),
                               "--limit", "3", "--base-url", server.base_url,
                               prefect_api=prefect_api)
    assert code == 2 and "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: the API call POST {server.base_url}/chat/completions failed: HTTP 401: "
        "Incorrect API key provided. (check the API key: OPENAI_API_KEY, or LOCALBATCH_API_KEY "
        "for an "
        "`enrichflow serve` started with --api-key)")


def test_cancel_stops_a_running_job(prefect_api, start_localbatch, tmp_path, capsys):
    server = start_localbatch(Simulation(requests_per_second=10, chunk_size=2))
    path = job_file(tmp_path, generated_movies(200), **{"limits.max_requests_per_shard": 100})
    run = start_job([ENRICHFLOW, "run", str(path), "--base-url", server.base_url],
                    prefect_api, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = tmp_path / "out" / "_state" / "run.json"
    wait_for_batches(run, lambda: journal.exists() and json.loads(journal.read_text()),
                     shards=2)

    assert main(["cancel", str(tmp_path / "out")]) == 0
    assert "2 batch(es) cancelled" in capsys.readouterr().out
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output[-2000:]
    assert "the job was cancelled" in output

    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 200
    failed = data[data["_status"] == "failed"]
    assert len(failed) > 0 and failed["_error"].str.startswith("batch_cancelled").all()
    client = sdk_client(server.base_url)
    assert {b.status for b in client.batches.list()} == {"cancelled"}
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["cancelled"]

    # The rule: running a cancelled job again sends the rows the cancel left unanswered,
    # and only those (the answers that finished are reused, not paid again).
    code, stdout, stderr = cli("run", str(path), "--base-url", server.base_url,
                               prefect_api=prefect_api)
    assert code == 0, stderr[-2000:]
    assert "rows:     200 ok" in stdout
    resent = [b for b in client.batches.list() if b.status == "completed"]
    assert sum(b.request_counts.total for b in resent) == len(failed)


def test_two_runs_of_one_output_at_once_pay_once(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch(Simulation(requests_per_second=1))
    path = job_file(tmp_path, generated_movies(20))
    first = start_job([ENRICHFLOW, "run", str(path), "--base-url", server.base_url],
                      prefect_api, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = tmp_path / "out" / "_state" / "run.json"
    wait_for_batches(first, lambda: journal.exists() and json.loads(journal.read_text()),
                     shards=1)

    code, _, stderr = cli("run", str(path), "--base-url", server.base_url,
                          prefect_api=prefect_api)
    assert code == 2
    assert "is being written by another run: flow run " in stderr
    assert f"process {first.pid} on " in stderr
    waiting = start_job([ENRICHFLOW, "run", str(path), "--base-url", server.base_url,
                         "--wait-for-lock"], prefect_api, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 0, output[-2000:]
    output, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, output[-2000:]
    assert "waiting for the other run of" in output and "already complete" in output
    assert len(sdk_client(server.base_url).batches.list().data) == 1, "one batch, paid once"


def test_ctrl_c_stops_the_run_at_once_and_says_what_runs_on(prefect_api, start_localbatch,
                                                           tmp_path):
    """Ctrl-C as a terminal sends it, to the whole process group, Prefect's temporary
    server included (no PREFECT_API_URL, as a user runs it): the run ends within 5 s
    with one line and exit code 130; run again, it collects the same batch."""
    import os
    import signal
    import time

    server = start_localbatch(Simulation(validating_seconds=10))
    path = job_file(tmp_path, generated_movies(30), limits={"max_requests_per_shard": 10})
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",
                                                             "OPENAI_API_KEY")}
    run = subprocess.Popen([ENRICHFLOW, "run", str(path), "--base-url", server.base_url],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    journal_file = tmp_path / "out" / "_state" / "run.json"
    journal = wait_for_batches(
        run, lambda: json.loads(journal_file.read_text()) if journal_file.exists() else None,
        shards=3, timeout=180)
    os.killpg(run.pid, signal.SIGINT)
    interrupted = time.monotonic()
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - interrupted < 5 and run.returncode == 130
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    batches = [s["batch_id"] for s in journal["shards"]]
    assert line.startswith(f"interrupted: 3 batch(es) ({', '.join(batches)}) run on at "
                           f"{server.base_url} and are billed as they finish; `enrichflow run")
    assert line.endswith(f"collects them without paying twice, `enrichflow cancel "
                         f"{tmp_path / 'out'}` stops them")
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "_state" / "lease.json").exists()

    assert main(["run", str(path), "--base-url", server.base_url]) == 0
    assert sorted(b.id for b in sdk_client(server.base_url).batches.list().data) == \
        sorted(batches)
    assert (pd.read_parquet(tmp_path / "out")["_status"] == "ok").all()
