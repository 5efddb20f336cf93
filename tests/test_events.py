"""The events a run emits, read back from Prefect's event API as an automation sees them."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from conftest import REPO, generated_movies, job_file
from prefect.events.schemas.automations import AutomationCore

from enrichflow.errors import CanaryFailedError, CostLimitError
from enrichflow.flows.enrich import enrich


def events_about(prefect_api: str, output: str, last: str, timeout: float = 30) -> list[dict]:
    """The enrichflow events about `output`, oldest first, once one named `last` is in."""
    deadline = time.monotonic() + timeout
    while True:
        events = httpx.post(f"{prefect_api}/events/filter", json={"filter": {
            "event": {"prefix": ["enrichflow."]},
            "resource": {"id": [f"enrichflow.output.{output}"]},
            "order": "ASC"}, "limit": 50}).json()["events"]
        if any(e["event"] == last for e in events):
            return events
        assert time.monotonic() < deadline, f"no {last} in {[e['event'] for e in events]}"
        time.sleep(0.5)


def test_a_run_tells_of_its_batches_and_its_end(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    path = job_file(tmp_path, generated_movies(10), **{"limits.max_requests_per_shard": 5})
    manifest = enrich(str(path), base_url=server.base_url)
    out = str(tmp_path / "out")
    events = events_about(prefect_api, out, "enrichflow.run.finished")
    assert sorted(e["event"] for e in events) == [
        "enrichflow.batch.completed", "enrichflow.batch.completed",
        "enrichflow.batch.created", "enrichflow.batch.created", "enrichflow.run.finished"]
    created = [e for e in events if e["event"] == "enrichflow.batch.created"]
    assert sorted(e["payload"]["batch"] for e in created) == sorted(
        s["batch_id"] for s in manifest["shards"])
    assert {e["payload"]["rows"] for e in created} == {5}
    finished = events[-1]
    assert finished["event"] == "enrichflow.run.finished"
    assert finished["payload"] == {"run": manifest["run_id"], "rows_by_status": {"ok": 10},
                                   "cost_usd": manifest["cost_usd"], "cancelled": False}
    roles = {r["prefect.resource.role"]: r for r in finished["related"]}
    assert roles["job"]["prefect.resource.name"] == "movies"
    assert roles["job"]["prefect.resource.id"] == "enrichflow.job.movies"
    assert "flow-run" in roles and "flow" in roles  # added by Prefect: the run it came from


def test_a_failed_canary_and_a_cost_cap_are_events(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    for folder in ("canary", "cap"):
        (tmp_path / folder).mkdir()
    unfillable = job_file(tmp_path / "canary", canary=True, **{
        "request.response_format.schema.properties.summary.pattern": "^[0-9]{3}$"})
    with pytest.raises(CanaryFailedError):
        enrich(str(unfillable), base_url=server.base_url)
    (event,) = events_about(prefect_api, str(tmp_path / "canary" / "out"),
                            "enrichflow.canary.failed")
    assert event["payload"]["rows"] == event["payload"]["failed"] == 20
    assert "does not match '^[0-9]{3}$'" in event["payload"]["first_error"]

    capped = job_file(tmp_path / "cap", max_cost_usd=0.000001)
    with pytest.raises(CostLimitError) as info:
        enrich(str(capped), base_url=server.base_url)
    (event,) = events_about(prefect_api, str(tmp_path / "cap" / "out"),
                            "enrichflow.cost-cap.reached")
    assert event["payload"] == {"message": str(info.value)}


def test_the_documented_automation_is_one_prefect_accepts_and_matches_our_events():

    text = (REPO / "docs" / "notify-on-canary-or-cost-cap.yaml").read_text()
    automation = AutomationCore.model_validate(yaml.safe_load(text))
    assert automation.trigger.expect == {"enrichflow.canary.failed",
                                         "enrichflow.cost-cap.reached"}
    assert automation.trigger.match.matches_every_resource_of_kind("enrichflow.output")


def test_the_zombie_automation_is_one_prefect_accepts():
    text = (REPO / "automations.yaml").read_text()
    (automation,) = [AutomationCore.model_validate(a) for a in yaml.safe_load(text)["automations"]]
    assert automation.trigger.posture == "Proactive"
    assert "prefect.flow-run.Suspended" in automation.trigger.expect  # a suspended run is quiet
