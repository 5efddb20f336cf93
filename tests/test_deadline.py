"""A deadline that holds: batches that would end too late give their unanswered rows to
the synchronous API, against the local server, as a user runs a job."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from conftest import generated_movies, job_file, sdk_client

from enrichflow.cli import main
from enrichflow.config import load_job
from enrichflow.errors import ConfigError
from enrichflow.flows.enrich import check_can_suspend, enrich
from enrichflow.tasks.estimate import Estimate, price_for
from localbatch import Simulation


def test_at_the_deadline_s_cutoff_the_rows_not_answered_go_through_the_synchronous_api(
        prefect_api, start_localbatch, tmp_path):
    """Shards of 10 rows that take 50 s a batch, one at a time, and a cutoff 25 s after
    the start: the running batch is cancelled and its answers kept, the next shard is
    never sent, and every row not answered is answered now, in OpenAI's flex tier for
    gpt-5-mini (at batch prices); every row is ok once, before the deadline."""
    server = start_localbatch(Simulation(requests_per_second=0.2))
    deadline = datetime.now(UTC) + timedelta(seconds=85)
    path = job_file(tmp_path, generated_movies(20), deadline=deadline.isoformat(),
                    **{"request.model": "gpt-5-mini", "limits.max_requests_per_shard": 10,
                       "limits.max_shards_in_flight": 1, "limits.deadline_lead_seconds": 60})
    manifest = enrich(str(path), base_url=server.base_url)
    assert datetime.now(UTC) < deadline

    (batch,) = sdk_client(server.base_url).batches.list().data
    assert batch.status == "cancelled", "the running batch is cancelled, the next not sent"
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all() and len(data) == 20
    by_batch = (data["_batch_id"] == batch.id).sum()
    now = data["_batch_id"].str.startswith("flex-")
    assert 0 < by_batch < 10 and now.sum() == 20 - by_batch
    price = price_for("gpt-5-mini", None)
    row = data[now].iloc[0]
    assert row["_cost_usd"] == pytest.approx(price.batch_cost(row["_prompt_tokens"],
                                                              row["_completion_tokens"]))
    assert manifest["deadline"]["rows_sent_now"] == now.sum()
    assert manifest["deadline"]["cost_usd"] == pytest.approx(data.loc[now, "_cost_usd"].sum())


def test_a_deadline_given_on_the_command_line_that_is_near_sends_every_row_now(
        prefect_api, start_localbatch, tmp_path, capsys):
    """`--deadline` closer than its lead: no batch is created; every row is answered in
    the standard tier (gpt-4o-mini offers no flex), at synchronous prices."""
    server = start_localbatch()
    path = job_file(tmp_path, generated_movies(12))
    soon = (datetime.now(UTC) + timedelta(minutes=10)).isoformat(timespec="seconds")
    assert main(["estimate", str(path), "--deadline", soon]) == 0
    assert "which is now: every row does" in capsys.readouterr().out

    assert main(["run", str(path), "--base-url", server.base_url, "--deadline", soon]) == 0
    assert "deadline: " + soon.replace("Z", "+00:00") + ": 12 rows taken out of their " \
        "batches and sent through the synchronous API" in capsys.readouterr().out
    assert sdk_client(server.base_url).batches.list().data == []
    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all() and data["_batch_id"].str.startswith("now-").all()
    price = price_for("gpt-4o-mini", None)
    assert data["_cost_usd"].sum() == pytest.approx(price.sync_cost(
        data["_prompt_tokens"].sum(), data["_completion_tokens"].sum()))


def test_the_estimate_says_whether_the_batches_likely_end_in_time():
    soon = Estimate(model="gpt-4o-mini", rows=10, not_sent=0, reused=0, requests=10,
                    shards=1, input_tokens=1000, output_ceiling=100, price=None,
                    deadline=datetime.now(UTC) + timedelta(hours=3), deadline_lead=3600,
                    turnaround=(1800.0, 5))
    said = dict(soon.forecast())["deadline"]
    assert "the rows not answered 1 h 0 min before it go through the synchronous API, in " \
           "2 h 0 min: likely in time (done in about 30 min)" in said, said
    assert "likely not in time" in dict(replace(soon, turnaround=(3 * 3600.0, 5)).forecast())[
        "deadline"]
    assert "whether the batches end by then is unknown" in dict(
        replace(soon, turnaround=None).forecast())["deadline"]
    past = replace(soon, deadline=datetime.now(UTC) + timedelta(minutes=30))
    assert dict(past.forecast())["deadline"].endswith("which is now: every row does")


def test_a_deadline_needs_a_run_that_polls(tmp_path):
    path = job_file(tmp_path, deadline="2026-12-04T07:00:00Z")
    with pytest.raises(ConfigError, match="wait_mode suspend cannot keep a deadline"):
        check_can_suspend(load_job(path))
