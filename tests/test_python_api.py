"""The Python API as a data scientist meets it: a DataFrame in, an enriched DataFrame out,
through the same flow, against a real local Batch API server over HTTP (and moto's S3)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
import venv
from enum import StrEnum
from pathlib import Path

import nbformat
import pandas as pd
import pyarrow as pa
import pytest
from conftest import REPO, generated_movies, sdk_client, start_job
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from pydantic import BaseModel

import enrichflow
from localbatch import LocalBatchServer, Simulation
from localbatch.chunks import WORKER_MIN_LINES

PROMPT = "Title: {Series_Title}\nOverview: {Overview}"


class Mood(StrEnum):
    light = "light"
    dark = "dark"


class Place(BaseModel):
    city: str
    country: str | None


class Movie(BaseModel):
    categories: list[str]
    summary: str
    mood: Mood
    place: Place
    sequel_of: str | None


def requests_at(server: LocalBatchServer) -> int:
    """Requests the server was sent, over all its batches."""
    return sum(b.request_counts.total for b in sdk_client(server.base_url).batches.list())


def test_a_pydantic_schema_gives_typed_columns(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    movies = generated_movies(6)
    enriched = enrichflow.enrich(movies, user=PROMPT, model="gpt-4o-mini", schema=Movie,
                                 provider={"base_url": server.base_url}, workdir=str(tmp_path))

    assert list(enriched.columns[:4]) == list(movies.columns)
    assert enriched["Series_Title"].tolist() == movies["Series_Title"].tolist()
    assert set(enriched["_status"]) == {"ok"}
    job = enrichflow.make_job(movies, user=PROMPT, model="gpt-4o-mini", schema=Movie,
                              provider={"base_url": server.base_url}, workdir=str(tmp_path))
    result = enrichflow.run(job, progress=False)  # the same run: collected, not sent again
    types = result.to_arrow().schema
    assert types.field("categories").type == pa.list_(pa.string())
    assert types.field("mood").type == pa.string()
    assert set(enriched["mood"]) <= {"light", "dark"}
    assert types.field("place").type == pa.struct([("city", pa.string()),
                                                   ("country", pa.string())])
    assert types.field("sequel_of").type == pa.string()
    assert requests_at(server) == 6
    assert "$0." in enrichflow.Result._repr_html_(result)

    # the schema the provider gets is strict, as OpenAI's SDK makes it for structured outputs
    body = enrichflow.preview(job, rows=1)[0]["body"]
    schema = body["response_format"]["json_schema"]
    assert schema["strict"] is True and schema["name"] == "Movie"
    assert schema["schema"]["additionalProperties"] is False
    assert set(schema["schema"]["required"]) == set(Movie.model_fields)


def test_the_same_call_again_sends_nothing_and_new_rows_alone_are_sent(
        prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    settings = {"user": PROMPT, "model": "gpt-4o-mini",
                "provider": {"base_url": server.base_url}, "workdir": str(tmp_path),
                "progress": False}
    first = enrichflow.enrich(generated_movies(8), **settings)
    again = enrichflow.enrich(generated_movies(8), **settings)
    assert requests_at(server) == 8
    pd.testing.assert_frame_equal(first, again)

    grown = enrichflow.enrich(generated_movies(11), **settings)  # 3 new rows
    assert requests_at(server) == 11
    assert grown["_reused"].sum() == 8 and len(grown) == 11

    # another table is another run: its own output and journal, not the first one's
    other = enrichflow.make_job(generated_movies(5), **{k: v for k, v in settings.items()
                                                        if k != "progress"})
    mine = enrichflow.make_job(generated_movies(8), **{k: v for k, v in settings.items()
                                                       if k != "progress"})
    assert other.output != mine.output and other.cache.uri == mine.cache.uri
    assert enrichflow.status(mine).complete and enrichflow.status(other) is None
    folders = enrichflow.workdirs(str(tmp_path))
    assert folders["runs"].tolist() == [3]


def test_arrow_tables_s3_data_and_an_s3_workdir(prefect_api, start_localbatch, s3_endpoint,
                                                 s3, tmp_path):
    server = start_localbatch()
    s3.mkdir("api-bucket")
    movies = generated_movies(5)
    s3.pipe("api-bucket/in/movies.parquet", movies.to_parquet(index=False))
    options = {"endpoint_url": s3_endpoint}
    settings = {"name": "movies", "user": PROMPT, "model": "gpt-4o-mini",
                "provider": {"base_url": server.base_url},
                "workdir": "s3://api-bucket/enrichflow", "storage_options": options,
                "progress": False}

    from_uri = enrichflow.enrich("s3://api-bucket/in/movies.parquet", **settings)
    from_table = enrichflow.enrich(pa.Table.from_pandas(movies), **settings)

    assert len(from_uri) == len(from_table) == 5
    assert from_table["_reused"].all()  # the answer cache lives in the S3 workdir
    assert requests_at(server) == 5
    journals = s3.glob("api-bucket/enrichflow/*/runs/*/output/_state/run.json")
    assert len(journals) == 2
    assert not list(tmp_path.iterdir())  # nothing was kept on local disk


def test_preview_and_estimate_send_nothing(start_localbatch, tmp_path):
    server = start_localbatch()
    movies = generated_movies(4)
    settings = {"user": PROMPT, "model": "gpt-4o-mini", "schema": Movie,
                "provider": {"base_url": server.base_url}, "workdir": str(tmp_path)}
    requests = enrichflow.preview(movies, rows=2, **settings)
    estimate = enrichflow.estimate(movies, **settings)

    assert [r["custom_id"] for r in requests] == ["preview-0", "preview-1"]
    assert "Movie number 1" in requests[1]["body"]["messages"][-1]["content"]
    assert estimate.requests == 4 and "<table" in estimate._repr_html_()
    client = sdk_client(server.base_url)
    assert not client.files.list().data and not client.batches.list().data


def test_a_mistyped_setting_is_named_before_anything_runs(tmp_path):
    with pytest.raises(TypeError, match="'max_tokns'; did you mean 'max_tokens'"):
        enrichflow.make_job(generated_movies(2), user=PROMPT, model="gpt-4o-mini",
                            max_tokns=10, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="request.temperature"):
        enrichflow.make_job(generated_movies(2), user=PROMPT, model="gpt-4o-mini",
                            temperature=9, workdir=str(tmp_path))
    assert not list(tmp_path.iterdir())


SCRIPT = """
print("the script's top level runs")
import enrichflow
from conftest import generated_movies

enriched = enrichflow.enrich(generated_movies({rows}), user="{{Overview}}", model="gpt-4o-mini",
                             workdir="{workdir}")
print("rows:", len(enriched))
"""


def test_a_script_without_a_main_guard_runs_its_job_once(prefect_api, tmp_path):
    """A plain `python job.py`, enough rows for the embedded server to answer them on
    worker processes: multiprocessing's would run the script again in each of them."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(rows=2 * WORKER_MIN_LINES, workdir=tmp_path / "work"))
    run = start_job([sys.executable, str(script)], prefect_api,
                    env_extra={"PYTHONPATH": str(REPO / "tests")}, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, output
    assert output.count("the script's top level runs") == 1, output
    assert f"rows: {2 * WORKER_MIN_LINES}" in output


CELL = """
import enrichflow
from conftest import generated_movies

enriched = enrichflow.enrich(generated_movies(60), user="{{Overview}}", model="gpt-4o-mini",
                             provider={{"base_url": "{base_url}"}}, workdir="{workdir}")
print("rows:", len(enriched))
"""


def test_interrupting_the_kernel_says_what_runs_on_and_the_same_cell_collects_it(
        start_localbatch, tmp_path, monkeypatch):
    """Jupyter's stop button mid-wait (SIGINT to the kernel's process group): one line,
    no traceback; running the cell again collects the batch: one batch, every row once."""
    server = start_localbatch(Simulation(requests_per_second=3))
    client = sdk_client(server.base_url)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # as a user's kernel: no server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    kernel, kernel_client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    cell = CELL.format(base_url=server.base_url, workdir=tmp_path / "work")
    try:
        interrupted = _execute(kernel_client, cell, interrupt=lambda: (
            _journaled_batches(tmp_path / "work") and kernel.interrupt_kernel() is None))
        again = _execute(kernel_client, cell)
    finally:
        kernel.shutdown_kernel(now=True)

    batch = client.batches.list().data[0].id
    assert len(interrupted["error"]) == 1, "\n".join(interrupted["error"])  # whole, if not
    assert interrupted["error"][0].startswith(
        f"interrupted: 1 batch(es) ({batch}) run on at the local Batch API server at "
        f"{server.base_url} and are billed as they finish; `the same enrichflow.enrich() or "
        "enrichflow.run() call in Python` "
        "collects them without paying twice")
    assert again["error"] is None and "rows: 60" in again["stdout"]
    assert len(client.batches.list().data) == 1
    assert requests_at(server) == 60


def _journaled_batches(workdir: Path) -> list[str]:
    journals = [json.loads(p.read_text()) for p in workdir.glob("*/runs/*/output/_state/run.json")]
    return [s["batch_id"] for journal in journals for s in journal["shards"] if s["batch_id"]]


def _execute(kernel_client, code: str, interrupt=None, timeout: float = 300) -> dict:
    """Run `code` in the kernel: its stdout and its error as Jupyter shows it. Calls
    `interrupt` every half second until it returns true."""
    message = kernel_client.execute(code)
    stdout, error, deadline = "", None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if interrupt is not None and interrupt():
            interrupt = None
        try:
            reply = kernel_client.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if reply["parent_header"].get("msg_id") != message:
            continue
        kind, content = reply["msg_type"], reply["content"]
        if kind == "stream" and content["name"] == "stdout":
            stdout += content["text"]
        elif kind == "error":
            error = content["traceback"]
        elif kind == "status" and content["execution_state"] == "idle":
            return {"stdout": stdout, "error": error}
    raise AssertionError(f"the cell did not finish within {timeout} s: {stdout[-2000:]}")


def test_the_quickstart_notebook_runs_in_a_jupyter_kernel(prefect_api, tmp_path,
                                                         monkeypatch):
    """docs/quickstart.ipynb, as a user runs it (the embedded local server): its outputs
    show the estimate table and the progress bar; run again, it sends no request."""
    monkeypatch.setenv("ENRICHFLOW_WORKDIR", str(tmp_path / "work"))  # the kernel's too
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    outputs = []
    for _ in range(2):
        notebook = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "docs")}}).execute()
        outputs.append(json.dumps([cell.get("outputs", []) for cell in notebook.cells]))
        code = [c.source for c in notebook.cells if c.cell_type == "code"]
        assert sum(line.count("enrichflow.") + line.startswith("import enrichflow")
                   for cell in code for line in cell.splitlines()) <= 3

    assert "requests to send" in outputs[0] and "<table" in outputs[0]
    assert "application/vnd.jupyter.widget-view+json" in outputs[0]  # the progress bar
    assert "ok" in outputs[1]
    data_dirs = list((tmp_path / "work").glob("*/runs/*/output/_state/localbatch"))
    assert len(data_dirs) == 1
    with LocalBatchServer(data_dirs[0]) as server:
        assert requests_at(server) == 20  # the first execution's, none from the second


def test_installing_puts_no_top_level_flows_or_tasks(tmp_path):
    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(REPO)],
                   check=True, capture_output=True, timeout=600)
    site = next((tmp_path / "env" / "lib").glob("python3*/site-packages"))
    installed = {p.name for p in site.iterdir()}
    assert "enrichflow" in installed and "localbatch" in installed
    assert not {"flows", "tasks"} & installed
    assert (site / "enrichflow" / "flows" / "enrich.py").exists()
    assert (site / "enrichflow" / "tasks" / "load.py").exists()
