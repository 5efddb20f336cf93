"""prefect.yaml for real: a Prefect server on loopback, a process work pool, `prefect deploy
--all`, a worker, runs triggered from outside, artifacts read back through the API."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import anthropic
import httpx
import pandas as pd
import psutil
import pytest
import yaml
from conftest import (
    ENRICHFLOW,
    REPO,
    eventually,
    free_port,
    job_file,
    ledger_tokens,
    sdk_client,
)
from google import genai
from google.genai.types import HttpOptions
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.schema_tools import validate

from enrichflow.cli import main
from enrichflow.storage import Location
from enrichflow.tasks.ledger import limit_name
from enrichflow.tasks.state import RunState
from localbatch import Simulation

PREFECT = str(Path(sys.executable).with_name("prefect"))
ANTHROPIC_KEY = "sk-ant-test"  # the worker's, for the runs on Anthropic
GEMINI_KEY = "gemini-test"  # and on Gemini


def test_every_entrypoint_imports_to_a_flow_whose_form_describes_its_parameters():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"movies", "furniture", "resume-ready",
                                                 "cancel-batches", "rerun-crashed"}
    for deployment in deployments:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
        assert isinstance(flow, Flow), deployment["entrypoint"]
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties)
        schema = flow.parameters.model_dump_for_openapi()
        for parameter, field in schema["properties"].items():
            # the UI's run form shows these (Prefect reads them from the docstring's Args:)
            assert field.get("description"), f"{deployment['name']}: {parameter}"
            # an anyOf is a toggle of types ("Property is type None"), not an input
            assert "anyOf" not in field, f"{deployment['name']}: {parameter}"
        # the form starts from the defaults and the deployment's values, and checks them
        # as the server does: submitted untouched, they pass
        untouched = {parameter: field["default"]
                     for parameter, field in schema["properties"].items() if "default" in field}
        validate({**untouched, **deployment.get("parameters", {})}, schema,
                 raise_on_error=True, ignore_required=True)
        assert "schedules" in deployment, "without it `prefect deploy` asks in a terminal"


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Prefect server of our own on loopback (SQLite) with its scheduler on, the pool,
    the deployments of prefect.yaml (deployed in a terminal, as a user does, from a
    process whose PWD is stale) and one worker that runs one flow run at a time."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PWD": "/",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
           "GEMINI_API_KEY": GEMINI_KEY}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        deadline = time.monotonic() + 180
        while not _healthy(env["PREFECT_API_URL"]):
            assert server.poll() is None and time.monotonic() < deadline, "no Prefect server"
            time.sleep(0.5)
        done = subprocess.run([PREFECT, "work-pool", "create", "enrich-pool", "--type",
                               "process"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        # in a terminal (script gives it one) with nothing to answer: a question would fail
        done = subprocess.run(["script", "-qefc", f"{PREFECT} deploy --all", "/dev/null"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
        done = subprocess.run([PREFECT, "automation", "create", "--from-file",
                               "automations.yaml"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=120)  # as `make automations` does
        assert done.returncode == 0, done.stdout + done.stderr
        worker = _start_worker(env, "default", limit=1)
        yield env
    finally:
        for process in (worker, server):
            if process is not None:
                _stop(process)


def _start_worker(env: dict[str, str], queue: str, limit: int) -> subprocess.Popen:
    """A process worker of enrich-pool that takes the runs of one work queue only (the
    deployments' runs go to `default`; a test's own worker gets runs sent to its queue)."""
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", "enrich-pool",
                             "--work-queue", queue, "--limit", str(limit)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@contextmanager
def worker_of_its_own(env: dict[str, str], queue: str, limit: int
                      ) -> Iterator[subprocess.Popen]:
    """A worker on a work queue of its own (created here), stopped at the end."""
    done = subprocess.run([PREFECT, "work-queue", "create", queue, "--pool", "enrich-pool"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    worker = _start_worker(env, queue, limit)
    try:
        yield worker
    finally:
        _stop(worker)


def _stop(process: subprocess.Popen) -> None:
    """Stop a process and its process group: politely, then not. (A worker's flow runs have
    sessions of their own; a worker stops them itself on SIGTERM.)"""
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


class RetryLikePrefect(httpx.HTTPTransport):
    """Sends a request again while the server answers 503 (SQLite was busy: the scheduler,
    the runs' logs) or does not answer in time, as Prefect's own client does; on a loaded
    2-core machine a CI run once saw the server take over 30 s to answer a GET."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(30):
            try:
                response = super().handle_request(request)
            except (httpx.ReadTimeout, httpx.ConnectTimeout, httpx.PoolTimeout):
                if attempt >= 4:
                    raise
                time.sleep(1)
                continue
            if response.status_code != 503:
                break
            response.close()
            time.sleep(1)
        return response


class PrefectAPI:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.http = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=60,
                                 transport=RetryLikePrefect())

    def run_with_cli(self, deployment: str, **parameters) -> str:
        """`prefect deployment run`, as docs/prefect.md says; returns the flow run id."""
        args = [arg for name, value in parameters.items()
                for arg in ("--param", f"{name}={value}")]
        done = subprocess.run([PREFECT, "deployment", "run", deployment, *args], env=self.env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)

    def run_on_queue(self, deployment: str, queue: str, **parameters) -> str:
        """A run of the deployment sent to one work queue (`prefect deployment run` has no
        such option); returns the flow run id."""
        created = self.http.post(f"/deployments/{self.deployment(deployment)['id']}"
                                 "/create_flow_run",
                                 json={"parameters": parameters, "work_queue_name": queue})
        created.raise_for_status()
        return created.json()["id"]

    def states(self, flow_run_id: str) -> list[dict]:
        """The states the run went through, oldest first."""
        states = self.http.get("/flow_run_states/", params={"flow_run_id": flow_run_id})
        return sorted(states.json(), key=lambda s: s["timestamp"])

    def state_names(self, flow_run_id: str) -> list[str]:
        return [s["name"] for s in self.states(flow_run_id)]

    def entered(self, flow_run_id: str, name: str) -> datetime:
        """When the run first entered the state `name`."""
        return next(datetime.fromisoformat(s["timestamp"]) for s in self.states(flow_run_id)
                    if s["name"] == name)

    def deployment(self, name: str) -> dict:
        return self.http.get(f"/deployments/name/{name}").json()

    @contextmanager
    def schedules_paused(self, deployment: str) -> Iterator[None]:
        """The deployment's schedules off (Prefect deletes the runs they had scheduled):
        a scheduled run in the middle of a test would take the turn of the test's own."""
        found = self.deployment(deployment)
        active = [s["id"] for s in found["schedules"] if s["active"]]

        def turn(on: bool) -> None:
            for schedule in active:
                self.http.patch(f"/deployments/{found['id']}/schedules/{schedule}",
                                json={"active": on}).raise_for_status()

        turn(False)
        try:
            yield
        finally:
            turn(True)

    def flow_runs(self, deployment: str, states: list[str]) -> list[dict]:
        return self.http.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}},
            "flow_runs": {"state": {"name": {"any_": states}}}}).json()

    def completed_reruns(self, deployment: str, flow_run_id: str) -> list[dict]:
        """The Completed runs that rerun-crashed started for a crashed run."""
        return [r for r in self.flow_runs(deployment, ["Completed"])
                if f"enrichflow-rerun-of:{flow_run_id}" in r["tags"]]

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

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self.http.post("/task_runs/filter", json={
            "task_runs": {"flow_run_id": {"any_": [flow_run_id]}}}).json()

    def logs(self, flow_run_id: str) -> str:
        logs = self.http.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()
        return "\n".join(entry["message"] for entry in logs)



def test_deploy_registers_the_schedules_and_the_real_directory(prefect_env):
    api = PrefectAPI(prefect_env)
    deployments = {name: api.deployment(name)
                   for name in ("enrich/movies", "enrich/furniture", "resume-ready/resume-ready")}
    schedules = {name: d["schedules"] for name, d in deployments.items()}
    assert [s["schedule"]["cron"] for s in schedules["enrich/movies"]] == ["0 6 * * *"]
    assert schedules["enrich/furniture"] == []
    assert [s["schedule"]["interval"] for s in schedules["resume-ready/resume-ready"]] == [300]
    for deployment in deployments.values():  # not the stale PWD ("/") of the deploying process
        (step,) = deployment["pull_steps"]
        assert step["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(REPO)}


def test_the_portable_recipe_runs_from_git_on_a_worker_in_another_folder(
        prefect_env, start_localbatch, tmp_path):
    """docs/prefect-git.yaml: deployed as its comments say; a worker started in an empty
    folder runs a job file that exists only in git, whose key comes from a Secret block
    named in it (the local server refuses any other key) and is stored nowhere else."""
    origin = tmp_path / "origin"
    env = {**prefect_env, "ENRICHFLOW_GIT_URL": f"file://{origin}"}
    subprocess.run(["git", "clone", "-q", str(REPO), str(origin)], check=True)
    job = yaml.safe_load((REPO / "configs" / "movies.yaml").read_text())
    job["provider"] = {"kind": "openai", "api_key_secret": "openai-api-key"}
    (origin / "configs" / "movies-keyed.yaml").write_text(yaml.safe_dump(job))
    for git in (["checkout", "-q", "-B", "main"], ["add", "configs/movies-keyed.yaml"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "keyed"]):
        subprocess.run(["git", "-C", str(origin), *git], check=True)
    save_secret = ("from prefect.blocks.system import Secret; "
                   "Secret(value='sk-from-the-block').save('openai-api-key', overwrite=True)")
    for command in ([PREFECT, "work-pool", "create", "enrich-remote", "--type", "process"],
                    [sys.executable, "-c", save_secret],
                    ["script", "-qefc", f"{PREFECT} deploy --prefect-file docs/prefect-git.yaml"
                                        " --all", "/dev/null"]):
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
    elsewhere = tmp_path / "worker-host"
    elsewhere.mkdir()
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "enrich-remote"],
                              env={**prefect_env, "PWD": str(elsewhere)}, cwd=elsewhere,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        api = PrefectAPI(prefect_env)
        server = start_localbatch(api_key="sk-from-the-block")
        run = api.run_with_cli("enrich/movies-git", config_path="configs/movies-keyed.yaml",
                               limit=5, output=str(tmp_path / "out"),
                               base_url=server.base_url)
        assert api.wait_for(run, {"Completed", "Failed", "Crashed"}) == "Completed", \
            api.logs(run)[-3000:]
    finally:
        _stop(worker)
    assert len(pd.read_parquet(tmp_path / "out")) == 5
    deployment = api.deployment("enrich/movies-git")
    (step,) = deployment["pull_steps"]  # the code came from git, not from a folder
    assert step["prefect.deployments.steps.git_clone"]["repository"] == \
        env["ENRICHFLOW_GIT_URL"]
    assert "sk-from-the-block" not in json.dumps(deployment), "the key is not stored in it"


def test_the_scheduler_creates_runs_and_the_worker_runs_them(prefect_env):
    api = PrefectAPI(prefect_env)
    # prefect.yaml's own schedules: the scheduler service fills them ahead
    assert eventually(lambda: api.flow_runs("enrich/movies", ["Scheduled"]))
    assert eventually(lambda: api.flow_runs("resume-ready/resume-ready", ["Scheduled"]))
    # one that is due within seconds, to see the worker pick a scheduled run up
    resume_ready = api.deployment("resume-ready/resume-ready")["id"]
    (added,) = api.http.post(f"/deployments/{resume_ready}/schedules", json=[
        {"schedule": {"interval": 10}, "active": True}]).json()
    try:
        def a_scheduled_run_completed():
            return [r for r in api.flow_runs("resume-ready/resume-ready", ["Completed"])
                    if r["auto_scheduled"]]
        (run, *_) = eventually(a_scheduled_run_completed, timeout=180)
        assert eventually(lambda: "suspended run(s)" in api.logs(run["id"]), 30)
    finally:
        api.http.delete(f"/deployments/{resume_ready}/schedules/{added['id']}")


def test_a_triggered_deployment_writes_parquet_and_artifacts(prefect_env, start_localbatch,
                                                            tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=4))
    run = api.run_with_cli("enrich/movies", limit=12, output=str(tmp_path / "movies"),
                           base_url=server.base_url)
    api.wait_for(run, {"Completed"})

    data = pd.read_parquet(tmp_path / "movies")
    assert len(data) == 12 and (data["_status"] == "ok").all()
    artifacts = api.artifacts(run)  # those we made (the server keeps the result as one too)
    by_key = {a["key"]: a for a in artifacts if a["type"]}
    assert len(by_key) == len([a for a in artifacts if a["type"]]) == 6
    assert {"movies-estimate", "movies-canary", "movies-progress", "movies-summary",
            "movies-rows", "movies-output"} == set(by_key)
    assert "passed" in by_key["movies-canary"]["data"]
    assert "6 of 6 sample rows answered usably" in by_key["movies-canary"]["data"]
    assert by_key["movies-progress"]["type"] == "progress"
    assert by_key["movies-progress"]["data"] == 100.0
    assert "12 rows enriched" in by_key["movies-summary"]["data"]
    assert f"output: `{tmp_path / 'movies'}`" in by_key["movies-summary"]["data"]
    assert "input tokens" in by_key["movies-estimate"]["data"]
    assert "| what | estimate |" in by_key["movies-estimate"]["data"]
    assert by_key["movies-rows"]["type"] == "table"
    first = json.loads(by_key["movies-rows"]["data"])[0]
    assert list(first)[:6] == ["Series_Title", "_status", "_error", "_cost_usd", "categories",
                               "summary"]
    assert first["_cost_usd"] == round(first["_cost_usd"], 6)
    # a browser refuses file:// links from a web page: the path is shown as text
    assert by_key["movies-output"]["type"] == "markdown"
    assert f"`{tmp_path / 'movies'}`" in by_key["movies-output"]["data"]
    # waiting is not failing: every poll of the 3-second batch passed, none was retried
    states = {t["state"]["name"] for t in api.task_runs(run)}
    assert states == {"Completed"}, states
    assert "Retry" not in api.logs(run)


def test_suspend_mode_frees_the_worker_and_resume_ready_survives_a_dead_provider(
        prefect_env, start_localbatch, tmp_path):
    api = PrefectAPI(prefect_env)
    with api.schedules_paused("resume-ready/resume-ready"):  # the test's runs report once
        _suspend_and_resume_past_a_dead_provider(api, start_localbatch, tmp_path)


def _suspend_and_resume_past_a_dead_provider(api: PrefectAPI, start_localbatch,
                                             tmp_path: Path) -> None:
    slow = start_localbatch(Simulation(requests_per_second=0.25))
    fast = start_localbatch()
    doomed = start_localbatch(Simulation(requests_per_second=0.01))
    suspended = api.run_with_cli("enrich/movies", limit=8, output=str(tmp_path / "movies"),
                                 base_url=slow.base_url, wait_mode="suspend")
    orphan = api.run_with_cli("enrich/movies", limit=2, output=str(tmp_path / "orphan"),
                              base_url=doomed.base_url, wait_mode="suspend")
    api.wait_for(suspended, {"Suspended"})
    api.wait_for(orphan, {"Suspended"})

    # The worker runs one flow run at a time: this one can only run if it is free.
    other = api.run_with_cli("enrich/furniture", limit=3, output=str(tmp_path / "furniture"),
                             base_url=fast.base_url)
    api.wait_for(other, {"Completed"})
    slow_client = sdk_client(slow.base_url)
    (batch,) = slow_client.batches.list().data
    if slow_client.batches.retrieve(batch.id).status != "completed":
        assert api.state(suspended) == "Suspended"
    assert len(pd.read_parquet(tmp_path / "furniture")) == 3

    eventually(lambda: slow_client.batches.retrieve(batch.id).status == "completed", 60)
    doomed.stop()  # the orphan's provider is gone: looking at it fails
    resumer = api.run_with_cli("resume-ready/resume-ready")
    assert api.wait_for(resumer, {"Failed", "Completed"}) == "Failed"
    logs = api.logs(resumer)
    assert "cannot look at suspended run" in logs and doomed.base_url in logs
    api.wait_for(suspended, {"Completed"})  # resumed all the same
    # reported once, not on every pass (288 red runs a day on a 5-minute schedule)
    again = api.run_with_cli("resume-ready/resume-ready")
    assert api.wait_for(again, {"Failed", "Completed"}) == "Completed"
    assert eventually(lambda: "still cannot look at suspended run" in api.logs(again), 30)
    api.http.post(f"/flow_runs/{orphan}/set_state", json={
        "state": {"type": "CANCELLED"}, "force": True})

    data = pd.read_parquet(tmp_path / "movies")
    assert len(data) == 8 and (data["_status"] == "ok").all()
    assert len(slow_client.batches.list().data) == 1, "nothing is submitted twice"
    assert "suspending the run" in api.logs(suspended)
    keys = [a["key"] for a in api.artifacts(suspended) if a["type"]]
    assert sorted(keys) == sorted(set(keys)), "one of each artifact, also after a resume"


def test_a_suspended_run_on_anthropic_is_resumed_when_its_message_batch_ends(
        prefect_env, start_localbatch, tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.5), api_key=ANTHROPIC_KEY)
    claude = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key=ANTHROPIC_KEY)
    run = api.run_with_cli("enrich/movies", limit=6, output=str(tmp_path / "out"),
                           provider="anthropic", base_url=server.anthropic_base_url,
                           model="claude-haiku-4-5", wait_mode="suspend")
    api.wait_for(run, {"Suspended"})
    (batch,) = claude.messages.batches.list()
    eventually(lambda: claude.messages.batches.retrieve(batch.id).processing_status == "ended",
               60)
    api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})
    api.wait_for(run, {"Completed"})
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 6 and (data["_status"] == "ok").all()
    assert (data["_batch_id"] == batch.id).sum() == 3  # the other 3: the canary's sample
    assert list(claude.messages.batches.list()) == [], "collected, then deleted"


def test_a_suspended_run_on_gemini_is_resumed_when_its_batch_job_ends(
        prefect_env, start_localbatch, tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.5), api_key=GEMINI_KEY)
    gemini = genai.Client(api_key=GEMINI_KEY,
                          http_options=HttpOptions(base_url=server.gemini_base_url))
    run = api.run_with_cli("enrich/movies", limit=6, output=str(tmp_path / "out"),
                           provider="gemini", base_url=server.gemini_base_url,
                           model="gemini-2.5-flash", wait_mode="suspend")
    api.wait_for(run, {"Suspended"})
    (job,) = gemini.batches.list()
    eventually(lambda: gemini.batches.get(name=job.name).done, 60)
    api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})
    api.wait_for(run, {"Completed"})
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 6 and (data["_status"] == "ok").all()
    assert (data["_batch_id"] == job.name).sum() == 3  # the other 3: the canary's sample
    assert list(gemini.batches.list()) == [], "collected, then deleted"


def test_a_suspended_run_collects_each_shard_and_holds_a_cancel(prefect_env, start_localbatch,
                                                               tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.05))
    client = sdk_client(server.base_url)
    job = job_file(tmp_path, **{"limits.max_requests_per_shard": 7})  # shards of 7 and 1
    out = tmp_path / "out"
    run = api.run_with_cli("enrich/movies", config_path=job, limit=8, base_url=server.base_url,
                           wait_mode="suspend")
    api.wait_for(run, {"Suspended"})

    def batch_of_shard(shard: str):
        return next(b for b in client.batches.list() if b.metadata["shard"] == shard)

    eventually(lambda: batch_of_shard("1").status == "completed", 60)
    api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})

    def suspended_again_with_shard_1_collected():
        shards = {s.shard: s for s in RunState.load(Location(str(out))).shards}
        return api.state(run) == "Suspended" and shards[1].status == "collected"
    eventually(suspended_again_with_shard_1_collected)
    moved = f"attempt 1, shard 1: batch {batch_of_shard('1').id} is completed; collected 1 ok"
    assert eventually(lambda: moved in api.logs(run), 30)
    assert batch_of_shard("0").status == "in_progress"
    waiter = api.run_with_cli("resume-ready/resume-ready")
    api.wait_for(waiter, {"Completed"})
    assert eventually(lambda: "keeps waiting" in api.logs(waiter), 30)
    assert api.state(run) == "Suspended"

    # cancelled while suspended: the resumed run honours it instead of sending again
    assert main(["cancel", str(out)]) == 0
    api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})
    api.wait_for(run, {"Completed"})
    data = pd.read_parquet(out)
    failed = data[data["_status"] == "failed"]
    assert len(data) == 8 and 0 < len(failed) < 8
    assert failed["_error"].str.startswith("batch_cancelled").all()
    assert json.loads((out / "_manifest.json").read_text())["cancelled"]
    assert len(client.batches.list().data) == 2, "the cancelled rows were not sent again"


def test_a_run_in_suspend_mode_suspends_while_its_canary_batch_runs(prefect_env,
                                                                     start_localbatch,
                                                                     tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=1))
    client = sdk_client(server.base_url)
    job = job_file(tmp_path, canary=True, **{"canary.mode": "batch"})
    run = api.run_with_cli("enrich/movies", config_path=job, limit=8, base_url=server.base_url,
                           wait_mode="suspend")
    api.wait_for(run, {"Suspended"})
    (canary,) = client.batches.list().data
    assert "enrichflow_canary" in canary.metadata
    assert eventually(lambda: f"waiting for the canary's batch {canary.id}" in api.logs(run), 30)

    eventually(lambda: client.batches.retrieve(canary.id).status == "completed", 60)
    api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})
    # resumed: the canary's answers pass, the other 4 rows go up as a shard, and it waits
    eventually(lambda: len(client.batches.list().data) == 2, 120)
    api.wait_for(run, {"Suspended"})
    shard = next(b for b in client.batches.list().data if b.id != canary.id)
    eventually(lambda: client.batches.retrieve(shard.id).status == "completed", 60)
    api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})
    api.wait_for(run, {"Completed"})

    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 8 and (data["_status"] == "ok").all()
    assert (data["_batch_id"].iloc[:4] == canary.id).all()
    assert len(client.batches.list().data) == 2, "nothing is submitted twice"


def test_cancelling_the_prefect_run_cancels_its_batches(prefect_env, start_localbatch,
                                                        tmp_path):
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.1))
    client = sdk_client(server.base_url)
    run = api.run_with_cli("enrich/movies", limit=5, output=str(tmp_path / "movies"),
                           base_url=server.base_url)
    (batch, *_) = eventually(lambda: client.batches.list().data, 120, 0.5)
    api.http.post(f"/flow_runs/{run}/set_state", json={"state": {"type": "CANCELLING"}})
    assert eventually(lambda: client.batches.retrieve(batch.id).status in
                      {"cancelling", "cancelled"}, 120)
    eventually(lambda: api.state(run) == "Cancelled", 120)
    assert eventually(lambda: "the run was cancelled" in api.logs(run), 30)


def test_cancelling_a_suspended_run_cancels_its_batches(prefect_env, start_localbatch,
                                                        tmp_path):
    """A suspended run has no process for its cancellation hook: the cancel-batches
    deployment, triggered by the run's Cancelled event, cancels its batch."""
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.05))
    client = sdk_client(server.base_url)
    out = tmp_path / "movies"
    run = api.run_with_cli("enrich/movies", limit=6, output=str(out),
                           base_url=server.base_url, wait_mode="suspend")
    api.wait_for(run, {"Suspended"})
    (batch,) = client.batches.list().data
    api.http.post(f"/flow_runs/{run}/set_state", json={"state": {"type": "CANCELLING"}})
    eventually(lambda: api.state(run) == "Cancelled", 60)
    cancelled_at = time.monotonic()
    assert eventually(lambda: client.batches.retrieve(batch.id).status in
                      {"cancelling", "cancelled"}, 60)
    print(f"batch cancelled {time.monotonic() - cancelled_at:.1f} s after the run")
    request = json.loads((out / "_state" / "cancel-requested.json").read_text())
    assert request["flow_run_id"] == run
    assert eventually(lambda: f"batch {batch.id} (attempt 1, shard 0) cancelled" in
                      api.logs(run), 30)
    (canceller,) = api.flow_runs("cancel-batches/cancel-batches", ["Completed"])
    assert canceller["parameters"] == {"flow_run": f"prefect.flow-run.{run}"}


def test_a_webhook_from_localbatch_resumes_a_suspended_run_within_seconds(
        prefect_env, start_localbatch, tmp_path):
    """OpenAI's batch.completed webhook, signed and sent by localbatch, received by
    `enrichflow webhooks`: the run resumes within seconds of its batch's end, with
    resume-ready's schedule off (no pass in between). A forged event is refused."""
    api = PrefectAPI(prefect_env)
    secret = "whsec_" + base64.b64encode(b"enrichflow-test-webhook-secret").decode()
    port = free_port()
    receiver = subprocess.Popen([ENRICHFLOW, "webhooks", "--port", str(port)],
                                env={**prefect_env, "OPENAI_WEBHOOK_SECRET": secret},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/webhooks/openai"
    try:
        eventually(lambda: _answers(url), 60)
        forged = httpx.post(url, content=b'{"type": "batch.completed"}', headers={
            "webhook-id": "evt_1", "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,Zm9yZ2Vk"})
        assert forged.status_code == 400

        server = start_localbatch(Simulation(requests_per_second=1, webhook_url=url,
                                             webhook_secret=secret))
        client = sdk_client(server.base_url)
        with api.schedules_paused("resume-ready/resume-ready"):
            run = api.run_with_cli("enrich/movies", limit=6, output=str(tmp_path / "out"),
                                   base_url=server.base_url, wait_mode="suspend")
            api.wait_for(run, {"Suspended"})
            (batch,) = client.batches.list().data
            assert eventually(lambda: client.batches.retrieve(batch.id).status == "completed",
                              60, every=0.1)
            ended = time.monotonic()
            assert eventually(lambda: api.state(run) != "Suspended", 30, every=0.2)
            print(f"resumed {time.monotonic() - ended:.1f} s after its batch ended")
            assert time.monotonic() - ended < 10
            assert api.wait_for(run, {"Completed", "Failed"}) == "Completed"
        data = pd.read_parquet(tmp_path / "out")
        assert len(data) == 6 and (data["_status"] == "ok").all()
    finally:
        _stop(receiver)
    assert f"batch.completed {batch.id}: 1 suspended run(s) resumed" in receiver.stdout.read()


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def test_a_suspended_run_past_max_wait_hours_ends_saying_its_batch_runs_on(
        prefect_env, start_localbatch, tmp_path):
    """Not Prefect's "The flow was paused and never resumed.": resume-ready resumes it
    and it fails as a poll-mode run does, its journal left for the next run."""
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.05))
    job = job_file(tmp_path, **{"limits.max_wait_hours": 0.005})  # 18 s
    run = api.run_with_cli("enrich/movies", config_path=job, limit=4, base_url=server.base_url,
                           wait_mode="suspend")
    api.wait_for(run, {"Suspended"})
    (batch,) = sdk_client(server.base_url).batches.list().data
    eventually(lambda: time.time() - batch.created_at > 19, 30)
    resumer = api.run_with_cli("resume-ready/resume-ready")
    api.wait_for(resumer, {"Completed"})
    assert eventually(lambda: "runs past limits.max_wait_hours" in api.logs(resumer), 30)
    eventually(lambda: api.state(run) == "Failed", 120)
    message = api.http.get(f"/flow_runs/{run}").json()["state"]["message"]
    assert f"batch(es) {batch.id} still running after limits.max_wait_hours (0.005 h); they " \
           "go on at the provider: run the job again later to collect them" in message
    assert sdk_client(server.base_url).batches.retrieve(batch.id).status == "in_progress"
    assert json.loads((tmp_path / "out" / "_state" / "run.json").read_text())["shards"]


def test_a_killed_run_s_tokens_come_back_without_a_person(prefect_env, start_localbatch,
                                                        tmp_path):
    """A run killed while its batch holds the organisation's whole token limit: another
    run waits for room instead of being refused, and gets it when the killed run's lease
    expires (no process renews it), which Prefect's repossessor gives back by itself."""
    limit = 500  # 3 movies are about 270 tokens: room for one run's shard, not two
    server = start_localbatch(Simulation(enqueued_token_limits={"gpt-4o-mini": limit},
                                         requests_per_second=0.15))  # 3 requests: 20 s
    ledger = limit_name("local", server.base_url, "gpt-4o-mini")
    prefect_url = prefect_env["PREFECT_API_URL"]
    env = {**prefect_env, "ENRICHFLOW_TOKEN_LEASE_SECONDS": "60"}
    paths = []
    for name in ("killed", "next"):
        (tmp_path / name).mkdir()
        paths.append(job_file(tmp_path / name, **{"limits.enqueued_token_budget": limit,
                                                   "limits.poll_interval_max": 1}))
    killed = subprocess.Popen([ENRICHFLOW, "run", str(paths[0]), "--limit", "3", "--base-url",
                               server.base_url], env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = sdk_client(server.base_url)
    # the shard takes its tokens before it creates its batch: kill once the batch holds them
    eventually(lambda: client.batches.list().data, 120, 0.5)
    assert ledger_tokens(prefect_url, ledger)[0] > 0
    os.killpg(killed.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    following = subprocess.run([ENRICHFLOW, "run", str(paths[1]), "--limit", "3", "--base-url",
                                server.base_url], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert following.returncode == 0, following.stdout + following.stderr
    print(f"the next run ended {time.monotonic() - killed_at:.0f} s after the kill")
    assert "waits for room" in following.stdout + following.stderr
    batches = client.batches.list().data
    assert [b.status for b in batches] == ["completed", "completed"], "none refused"
    assert ledger_tokens(prefect_url, ledger)[0] == 0


def test_a_suspended_run_keeps_its_tokens_until_its_batch_is_collected(
        prefect_env, start_localbatch, tmp_path):
    """The suspended run has no process to renew its token lease: resume-ready does, at
    each pass that leaves it waiting; the tokens go back when the resumed run collects."""
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.05))
    ledger = limit_name("local", server.base_url, "gpt-4o-mini")
    prefect_url = prefect_env["PREFECT_API_URL"]
    path = job_file(tmp_path, **{"limits.enqueued_token_budget": 100_000})
    with api.schedules_paused("resume-ready/resume-ready"):
        run = api.run_with_cli("enrich/movies", config_path=str(path), limit=6,
                               base_url=server.base_url, wait_mode="suspend")
        api.wait_for(run, {"Suspended"})
        held = ledger_tokens(prefect_url, ledger)[0]
        assert held > 0
        renewer = api.run_with_cli("resume-ready/resume-ready")
        assert api.wait_for(renewer, {"Completed"}) == "Completed"
        assert eventually(lambda: "1 token lease(s) renewed" in api.logs(renewer), 30)
        assert ledger_tokens(prefect_url, ledger)[0] == held
        (batch,) = sdk_client(server.base_url).batches.list().data
        eventually(lambda: sdk_client(server.base_url).batches.retrieve(batch.id).status
                   == "completed", 120)
        api.wait_for(api.run_with_cli("resume-ready/resume-ready"), {"Completed"})
        api.wait_for(run, {"Completed"})
    assert ledger_tokens(prefect_url, ledger)[0] == 0



def test_a_crashed_run_is_run_again_and_pays_once(prefect_env, start_localbatch, tmp_path):
    """The run's process killed (its machine lost, the worker left): the worker marks it
    Crashed, the rerun-crashed deployment runs it again, which re-attaches to its batch."""
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.5))
    client = sdk_client(server.base_url)
    out = tmp_path / "movies"
    run = api.run_with_cli("enrich/movies", limit=6, output=str(out), base_url=server.base_url)
    (batch,) = eventually(lambda: client.batches.list().data, 120, 0.5)
    engine = subprocess.run(["pgrep", "-f", "prefect.engine"], capture_output=True,
                            text=True).stdout.split()
    assert len(engine) == 1, engine  # the worker runs one flow run at a time
    os.kill(int(engine[0]), signal.SIGKILL)
    eventually(lambda: api.state(run) == "Crashed", 120)

    (rerun,) = eventually(lambda: api.completed_reruns("enrich/movies", run), 240)
    assert "enrichflow-rerun:1" in rerun["tags"] and rerun["parameters"]["limit"] == 6
    assert eventually(lambda: "crashed: run again as" in api.logs(run), 30)
    assert [b.id for b in client.batches.list().data] == [batch.id], "paid once"
    data = pd.read_parquet(out)
    assert len(data) == 6 and (data["_status"] == "ok").all()


def test_a_lost_machine_is_crashed_by_its_missing_heartbeats_and_run_again(
        prefect_env, start_localbatch, tmp_path):
    """Worker and flow-run process killed together, as when their machine is lost: nothing
    is left to say the run crashed. The automation of automations.yaml marks it Crashed
    once its heartbeats stop (90 s), rerun-crashed runs it again, and the rerun
    re-attaches to its batch."""
    api = PrefectAPI(prefect_env)
    server = start_localbatch(Simulation(requests_per_second=0.05))
    client = sdk_client(server.base_url)
    out = tmp_path / "movies"
    with worker_of_its_own(prefect_env, "lost-machine", limit=1) as machine:
        run = api.run_on_queue("enrich/movies", "lost-machine", limit=6, output=str(out),
                               base_url=server.base_url)
        (batch,) = eventually(lambda: client.batches.list().data, 180, 0.5)
        assert eventually(lambda: "heartbeat" in _event_names(api, run), 90)
        lost = [machine, *(psutil.Process(machine.pid).children(recursive=True))]
        for process in lost:  # the run has a session of its own: killed one by one
            process.kill()
        lost_at = time.monotonic()
    assert api.state(run) == "Running"
    eventually(lambda: api.state(run) == "Crashed", 240, every=2)
    print(f"marked Crashed {time.monotonic() - lost_at:.0f} s after its machine was lost")
    message = api.http.get(f"/flow_runs/{run}").json()["state"]["message"]
    assert message == "no heartbeat for 90 s: its process or machine was lost"

    (rerun,) = eventually(lambda: api.completed_reruns("enrich/movies", run), 300, every=2)
    assert [b.id for b in client.batches.list().data] == [batch.id], "one batch: paid once"
    data = pd.read_parquet(out)
    assert len(data) == 6 and (data["_status"] == "ok").all()
    assert (data["_batch_id"] == batch.id).sum() == 3  # the other 3: the canary's sample


def _event_names(api: PrefectAPI, flow_run_id: str) -> list[str]:
    events = api.http.post("/events/filter", json={"filter": {
        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}}).json()["events"]
    return [event["event"].removeprefix("prefect.flow-run.") for event in events]


def test_two_runs_of_one_output_at_once_the_second_waits_then_finds_it_complete(
        prefect_env, start_localbatch, tmp_path):
    """A worker that runs two flow runs at once: another job runs beside the first, but a
    second run of the same deployment waits for its concurrency slot (not a red LeaseError
    run), then finds the output complete and sends nothing."""
    api = PrefectAPI(prefect_env)
    slow = start_localbatch(Simulation(requests_per_second=0.05))
    fast = start_localbatch()
    out = tmp_path / "movies"
    with worker_of_its_own(prefect_env, "pair", limit=2):
        first = api.run_on_queue("enrich/movies", "pair", limit=6, output=str(out),
                                 base_url=slow.base_url)
        api.wait_for(first, {"Running"})
        second = api.run_on_queue("enrich/movies", "pair", limit=6, output=str(out),
                                  base_url=slow.base_url)
        beside = api.run_on_queue("enrich/furniture", "pair", limit=3,
                                  output=str(tmp_path / "furniture"), base_url=fast.base_url)
        api.wait_for(beside, {"Completed"})
        assert api.wait_for(second, {"Completed"}, timeout=300)
        # however loaded the machine: the furniture run started before the first ended
        assert api.entered(beside, "Running") < api.entered(first, "Completed"), \
            "the furniture run ran beside the first"
        # its process sends its last logs as it ends: while its worker still runs
        assert eventually(lambda: "is already complete" in api.logs(second), 60)
    assert "AwaitingConcurrencySlot" in api.state_names(second)
    assert len(sdk_client(slow.base_url).batches.list().data) == 1, "sent once"
    assert len(pd.read_parquet(out)) == 6
