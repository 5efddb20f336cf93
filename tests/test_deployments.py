"""prefect.yaml for real: a Prefect server on loopback, a process work pool, `prefect deploy
--all`, a worker, runs triggered from outside, artifacts read back through the API."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from conftest import REPO, free_port, sdk_client
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint

from localbatch import Simulation

PREFECT = str(Path(sys.executable).with_name("prefect"))


def test_every_entrypoint_imports_to_a_flow():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"movies", "furniture", "resume-ready"}
    for deployment in deployments:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
        assert isinstance(flow, Flow), deployment["entrypoint"]
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Prefect server of our own on loopback (SQLite), with the pool, the deployments
    of prefect.yaml and one worker that runs one flow run at a time."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PWD": str(REPO),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # the tests trigger every run themselves: a scheduled resume-ready run must not
           # resume the suspended run at a moment the test does not choose
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        deadline = time.monotonic() + 180
        while not _healthy(env["PREFECT_API_URL"]):
            assert server.poll() is None and time.monotonic() < deadline, "no Prefect server"
            time.sleep(0.5)
        for command in (["work-pool", "create", "enrich-pool", "--type", "process"],
                        ["--no-prompt", "deploy", "--all"]):
            done = subprocess.run([PREFECT, *command], env=env, cwd=REPO, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "enrich-pool",
                                   "--limit", "1"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        yield env
    finally:
        for process in (worker, server):
            if process is not None:
                _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop a process and what it started (a worker's flow runs): politely, then not."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class PrefectAPI:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.http = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)

    def run_with_cli(self, deployment: str, **parameters) -> str:
        """`prefect deployment run`, as the README says; returns the flow run id."""
        args = [arg for name, value in parameters.items()
                for arg in ("--param", f"{name}={value}")]
        done = subprocess.run([PREFECT, "deployment", "run", deployment, *args], env=self.env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)

    def state(self, flow_run_id: str) -> str:
        return self.http.get(f"/flow_runs/{flow_run_id}").json()["state"]["name"]

    def wait_for(self, flow_run_id: str, states: set[str], timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(flow_run_id)) not in states:
            assert state not in {"Failed", "Crashed", "Cancelled"}, self.logs(flow_run_id)
            assert time.monotonic() < deadline, f"{flow_run_id} still {state}"
            time.sleep(1)
        return state

    def artifacts(self, flow_run_id: str) -> list[dict]:
        return self.http.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()

    def logs(self, flow_run_id: str) -> str:
        logs = self.http.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()
        return "\n".join(entry["message"] for entry in logs)


def test_deploy_registers_the_schedules(prefect_env):
    api = PrefectAPI(prefect_env)
    schedules = {name: api.http.get(f"/deployments/name/{name}").json()["schedules"]
                 for name in ("enrich/movies", "enrich/furniture", "resume-ready/resume-ready")}
    assert [s["schedule"]["cron"] for s in schedules["enrich/movies"]] == ["0 6 * * *"]
    assert schedules["enrich/furniture"] == []
    assert [s["schedule"]["interval"] for s in schedules["resume-ready/resume-ready"]] == [300]


def test_a_triggered_deployment_writes_parquet_and_artifacts(prefect_env, start_localbatch,
                                                            tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch()
    run = api.run_with_cli("enrich/movies", limit=12, output=str(tmp_path / "movies"),
                           base_url=server.base_url)
    api.wait_for(run, {"Completed"})

    data = pd.read_parquet(tmp_path / "movies")
    assert len(data) == 12 and (data["_status"] == "ok").all()
    artifacts = api.artifacts(run)
    by_key = {a["key"]: a for a in artifacts}
    assert {"movies-estimate", "movies-progress", "movies-summary", "movies-rows",
            "movies-output"} <= set(by_key)
    assert by_key["movies-progress"]["type"] == "progress"
    assert by_key["movies-progress"]["data"] == 100.0
    assert "12 rows enriched" in by_key["movies-summary"]["data"]
    assert by_key["movies-rows"]["type"] == "table"
    assert f"file://{tmp_path / 'movies'}" in by_key["movies-output"]["data"]  # a link
    assert "input tokens" in by_key["movies-estimate"]["data"]


def test_suspend_mode_frees_the_worker_and_resumes_when_batches_are_done(
        prefect_env, start_localbatch, tmp_path):
    api = PrefectAPI(prefect_env)
    slow = start_localbatch(Simulation(requests_per_second=1))
    fast = start_localbatch()
    suspended = api.run_with_cli("enrich/movies", limit=8, output=str(tmp_path / "movies"),
                                 base_url=slow.base_url, wait_mode="suspend")
    api.wait_for(suspended, {"Suspended"})

    # The worker runs one flow run at a time: this one can only run if it is free.
    other = api.run_with_cli("enrich/furniture", limit=3, output=str(tmp_path / "furniture"),
                             base_url=fast.base_url)
    api.wait_for(other, {"Completed"})
    assert api.state(suspended) == "Suspended"
    assert len(pd.read_parquet(tmp_path / "furniture")) == 3

    slow_client = sdk_client(slow.base_url)
    (batch,) = slow_client.batches.list().data
    deadline = time.monotonic() + 60
    while slow_client.batches.retrieve(batch.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    resumer = api.run_with_cli("resume-ready/resume-ready")
    api.wait_for(resumer, {"Completed"})
    api.wait_for(suspended, {"Completed"})

    data = pd.read_parquet(tmp_path / "movies")
    assert len(data) == 8 and (data["_status"] == "ok").all()
    assert len(slow_client.batches.list().data) == 1, "nothing is submitted twice"
    assert "suspending the run" in api.logs(suspended)
