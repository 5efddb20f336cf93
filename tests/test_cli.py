"""The `enrichflow` command as a user runs it: run, status, cancel, and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pandas as pd
from conftest import (
    ENRICHFLOW,
    REPO,
    generated_movies,
    job_file,
    sdk_client,
    start_job,
    wait_for_batches,
    wait_until,
)

from enrichflow.cli import main
from localbatch import Simulation


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


def test_make_demo_runs_on_the_local_server_whatever_the_shell_holds(prefect_api):
    """An OPENAI_API_KEY in the shell (common) must not send the demo to OpenAI, billed;
    the run says who answers, at its start and in its summary."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OPENAI_API_KEY": "sk-bogus"}
    demo = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "answered by: enrichflow's embedded local server (mock answers" in demo.stdout
    assert "nothing was billed" in demo.stdout
    if "already complete" not in demo.stdout:  # out/movies of an earlier demo: no run
        assert "movies: enrichflow's embedded local server (mock answers: placeholders, " \
               "and costs are what OpenAI would charge) answers, model gpt-4o-mini" \
               in demo.stderr


def test_a_mistyped_model_is_refused_before_anything_is_sent(prefect_api, start_localbatch,
                                                             tmp_path):
    server = start_localbatch()
    code, stdout, stderr = cli("run", "configs/movies.yaml", "--model", "gpt-4o-mnii",
                               "--output", str(tmp_path / "out"), "--base-url", server.base_url,
                               prefect_api=prefect_api)
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: request.model: {server.base_url}/ has no model 'gpt-4o-mnii'; "
                      "did you mean 'gpt-4o-mini'? Nothing was sent"]
    client = sdk_client(server.base_url)
    assert not client.files.list().data and not client.batches.list().data


def test_errors_are_one_clear_line(prefect_api, tmp_path):
    code, _, stderr = cli("run", "configs/nope.yaml", prefect_api=prefect_api)
    assert code == 2 and stderr.strip() == "error: configs/nope.yaml: no such job file"
    assert cli("status", str(tmp_path), prefect_api=prefect_api)[0] == 1
    code, _, stderr = cli("run", "configs/movies.yaml", "--limit", "0", prefect_api=prefect_api)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        "enrichflow run: error: argument --limit: must be a positive number of rows, not 0")


def test_mistakes_in_the_data_are_one_line_before_prefect_starts(prefect_api, tmp_path):
    """The pre-flight finds them: one error line, with the fix, nothing of Prefect's."""
    path = job_file(tmp_path, **{"dataset.path": "data/movie.csv"})
    code, stdout, stderr = cli("run", str(path), prefect_api=prefect_api)
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(
        "error: dataset.path: data/movie.csv does not exist (did you mean data/movies.csv?); "
        "check the path (relative paths start from the directory you run in, ")
    path = job_file(tmp_path, **{"dataset.id_colum": "Series_Title",
                                 "request.response_format.schema.properties.summary.type":
                                     "strin"})
    code, stdout, stderr = cli("run", str(path), prefect_api=prefect_api)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "dataset.id_colum: unknown field; did you mean id_column?" in stderr
    assert "the schema is not valid JSON Schema at properties.summary.type: 'strin' " in stderr
    path = job_file(tmp_path, **{"request.user": "Overview: {Overviw}"})
    code, stdout, stderr = cli("run", str(path), prefect_api=prefect_api)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "column(s) Overviw that " in stderr and "(did you mean Overview?)" in stderr
    code, stdout, stderr = cli("--verbose", "run", str(path), prefect_api=prefect_api)
    assert code == 1 and "Traceback" in stderr


def test_on_a_terminal_a_progress_bar_follows_the_requests_below_the_log(prefect_api,
                                                                         tmp_path):
    """On a terminal (a pty 120 columns wide): one tqdm bar, refreshed at each poll, ends
    at every request done; each log line starts a line of its own, above the bar. Not a
    terminal (a pipe, as in the other tests): no bar."""
    import fcntl
    import pty
    import struct
    import termios

    path = job_file(tmp_path, generated_movies(60), canary=True)  # 20 synchronous, 40 batch
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    run = start_job([ENRICHFLOW, "run", str(path)], prefect_api, stdout=follower,
                    stderr=follower)
    os.close(follower)
    screen = b""
    while chunk := _read_pty(leader):
        screen += chunk
    os.close(leader)
    assert run.wait(timeout=60) == 0, screen.decode()[-3000:]
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen.decode())  # colours, cursor moves
    lines = text.replace("\r\n", "\n").replace("\r", "\n").splitlines()
    bars = [line for line in lines if line.startswith("movies:") and "%|" in line]
    assert bars and bars[-1].startswith("movies: 100%|") and "60/60" in bars[-1]
    assert "0 failed, 0 of 1 batch(es) running" in bars[-1]
    logged = [line for line in lines if " | INFO " in line]
    assert len(logged) > 10 and all("%|" not in line for line in logged)  # none glued on

    code, _, stderr = cli("run", str(path), "--force", prefect_api=prefect_api)
    assert code == 0 and "%|" not in stderr


def _read_pty(leader: int) -> bytes:
    """What the process wrote to its terminal since the last read; b"" once it ended."""
    try:
        return os.read(leader, 65536)
    except OSError:  # EIO: every writer closed its end
        return b""


def test_preview_prints_the_first_requests_as_uploaded_and_sends_nothing(tmp_path):
    """No server, no key, no Prefect: the lines a run would upload, ready for `jq`."""
    path = job_file(tmp_path, **{"provider.base_url": "http://127.0.0.1:9/v1"})
    preview = subprocess.run([ENRICHFLOW, "preview", str(path), "-n", "2", "--model",
                              "gpt-4o"], capture_output=True, text=True, timeout=60)
    assert preview.returncode == 0, preview.stderr
    lines = [json.loads(line) for line in preview.stdout.splitlines()]
    first_two = pd.read_csv(REPO / "data" / "movies.csv").head(2)
    assert [line["custom_id"] for line in lines] == \
        [f"preview-{title}" for title in first_two["Series_Title"]]
    assert {line["body"]["model"] for line in lines} == {"gpt-4o"}
    assert first_two["Overview"][0] in lines[0]["body"]["messages"][-1]["content"]


def test_an_error_inside_the_flow_is_one_line_without_tracebacks(prefect_api, tmp_path):
    """Found by the flow (the cost cap, over every row): said once, by the last line;
    Prefect's records of it (exception, traceback, failed state) stay in its API."""
    path = job_file(tmp_path, max_cost_usd=0.000001)
    code, stdout, stderr = cli("run", str(path), prefect_api=prefect_api)
    assert code == 2
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1].startswith("error: this job may cost up to ")
    assert (stdout + stderr).count("may cost up to") == 1


def test_a_provider_error_names_the_call_the_status_and_the_fix(prefect_api, start_localbatch,
                                                                tmp_path):
    server = start_localbatch(api_key="sk-the-right-one")
    code, stdout, stderr = cli("run", "configs/movies.yaml", "--output", str(tmp_path / "out"),
                               "--limit", "3", "--base-url", server.base_url,
                               prefect_api=prefect_api)
    assert code == 2 and "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines() == [  # the pre-flight's, before Prefect starts
        f"error: the API call GET {server.base_url}/models/gpt-4o-mini failed: HTTP 401: "
        "Incorrect API key provided. (check the API key: OPENAI_API_KEY, AZURE_OPENAI_API_KEY, "
        "ANTHROPIC_API_KEY or GEMINI_API_KEY as the provider is, or LOCALBATCH_API_KEY for an "
        "`enrichflow serve` started with --api-key)"]


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
    assert run.returncode == 3, output[-2000:]  # its own code: the rows are not all there
    assert "the job was cancelled" in output
    assert "cancelled: rows not answered are failed; run the job again to send them" in output

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
    server = start_localbatch(Simulation(requests_per_second=0.5))
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
    """Ctrl-C as a terminal sends it, to the whole process group (no PREFECT_API_URL, as
    a user runs it: the run's own Prefect server, in its own session, does not get it):
    the run ends within 5 s with one line, no traceback, and exit code 130; run again,
    it collects the same batch."""
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
    assert line.startswith(f"interrupted: 3 batch(es) ({', '.join(batches)}) run on at the "
                           f"local Batch API server at {server.base_url} and are billed as "
                           "they finish; `enrichflow run")
    assert line.endswith(f"collects them without paying twice, `enrichflow cancel "
                         f"{tmp_path / 'out'}` stops them")
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "_state" / "lease.json").exists()

    # `status` asks the provider: the batches finished there after the run stopped
    client = sdk_client(server.base_url)
    for batch in batches:
        wait_until(client, batch, statuses={"completed"}, timeout=120)
    code, stdout, _ = cli("status", str(tmp_path / "out"), prefect_api=prefect_api)
    assert code == 0 and stdout.count(" completed 10/10") == 3, stdout

    code, _, stderr = cli("run", str(path), "--base-url", server.base_url,
                          prefect_api=prefect_api)
    assert code == 0, stderr[-2000:]
    assert sorted(b.id for b in sdk_client(server.base_url).batches.list().data) == \
        sorted(batches)
    assert (pd.read_parquet(tmp_path / "out")["_status"] == "ok").all()
    # it says so first, and estimates nothing left to send
    assert stderr.index(f"movies: resuming run {journal['run_id']}") < stderr.index("estimate:")
    assert "already sent by the run this one resumes: 30" in stderr
    assert re.search(r"requests to send: +0\n", stderr)


def test_ctrl_c_in_the_first_second_says_nothing_was_sent(tmp_path):
    """Before the run has started (imports, the pre-flight, Prefect's start): one line,
    no traceback, exit code 130."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",
                                                             "OPENAI_API_KEY")}
    run = subprocess.Popen([ENRICHFLOW, "run", "configs/movies.yaml", "--output",
                            str(tmp_path / "out"), "--limit", "3"], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    time.sleep(1)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: nothing was sent"), stderr
    assert "Traceback" not in stderr
