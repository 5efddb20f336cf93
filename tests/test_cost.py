"""Cost control: token counts, estimates, the cap, reused answers, the enqueued-token budget."""

from __future__ import annotations

import base64
import io
import json
from datetime import date

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import generated_movies, job_file, sdk_client
from PIL import Image

from enrichflow.cli import main
from enrichflow.config import PriceOverride, load_job
from enrichflow.errors import CostLimitError
from enrichflow.flows.enrich import enrich
from enrichflow.storage import Location
from enrichflow.tasks.cache import CACHED, DEFAULT_FILE, HASH, AnswerCache
from enrichflow.tasks.estimate import (
    Estimate,
    chat_prompt_tokens,
    image_tokens,
    price_for,
    price_table,
)
from enrichflow.tasks.prepare import prepare_job
from enrichflow.tasks.spend import NOT_SENT_FOR_THE_CAP, CostCap
from enrichflow.tasks.state import RunState, ShardRecord
from localbatch import Simulation

# Hand count: 3 to prime the reply, then per message 3 + its role + its content, with
# o200k_base: "system" 1, "You are terse." 4 (You| are| ter|se.), "user" 1,
# "Hello world" 2, "Describe this chair." 4.
SYSTEM = {"role": "system", "content": "You are terse."}


def png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_text_tokens_match_a_hand_count():
    body = {"model": "gpt-4o-mini",
            "messages": [SYSTEM, {"role": "user", "content": "Hello world"}]}
    assert chat_prompt_tokens(body) == 3 + (3 + 1 + 4) + (3 + 1 + 2)
    named = {"model": "gpt-4o", "messages": [{"role": "user", "name": "user",
                                              "content": "Hello world"}]}
    assert chat_prompt_tokens(named) == 3 + (3 + 1 + 1 + 1 + 2)


def test_image_tokens_follow_openai_published_examples():
    assert image_tokens("gpt-4o", 1024, 1024, "high") == 85 + 170 * 4
    assert image_tokens("gpt-4o", 2048, 4096, "high") == 85 + 170 * 6
    assert image_tokens("gpt-4o", 4096, 8192, "low") == 85
    assert image_tokens("gpt-4o-mini", 512, 512, "low") == 2833
    assert image_tokens("gpt-4.1-mini", 1024, 1024, "auto") == 1659  # 1024 patches x 1.62
    assert image_tokens("gpt-4.1-mini", 1800, 2400, "auto") == 2353  # 1452 patches x 1.62


def test_image_request_tokens_count_inlined_and_remote_images():
    content = [{"type": "text", "text": "Describe this chair."},
               {"type": "image_url", "image_url": {"url": png(2048, 4096), "detail": "high"}},
               {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg",
                                                   "detail": "high"}}]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    assert chat_prompt_tokens(body) == 3 + 3 + 1 + 4 + (85 + 170 * 6) + (85 + 170 * 4)


def test_estimate_figures_and_prices(tmp_path):
    rows = generated_movies(10)
    job = load_job(job_file(tmp_path, rows, **{"request.max_tokens": 100}))
    estimate = prepare_job(job).estimate
    assert (estimate.rows, estimate.requests, estimate.reused, estimate.shards) == (10, 10, 0, 1)
    assert estimate.output_ceiling == 1000
    low, high = estimate.batch_range()
    assert low == pytest.approx(estimate.input_tokens * 0.075 / 1e6)
    assert high == pytest.approx(low + 1000 * 0.30 / 1e6)
    assert estimate.sync_range() == pytest.approx((2 * low, 2 * high))
    # a synchronous canary's sample is counted at synchronous prices (twice batch's)
    with_canary = prepare_job(load_job(job_file(tmp_path, generated_movies(40), canary=True,
                                                **{"request.max_tokens": 100}))).estimate
    assert with_canary.sync_canary == 20 and "canary:" in with_canary.text()
    price = with_canary.price
    assert with_canary.batch_range()[0] == pytest.approx(
        price.batch_cost(with_canary.input_tokens, 0) * 1.5)
    assert price_for("gpt-4o-mini-2024-07-18", None).batch_output == 0.30
    assert price_for("my-own-model", None) is None
    # a typo is unknown, not the price of the model it starts with (gpt-4o: 16.7x)
    assert price_for("gpt-4o-mnii", None) is None
    assert price_for("gpt-4o-2024-08-06", None).input == price_for("gpt-4o", None).input
    assert price_for("x", PriceOverride(input=1, output=2)).batch_output == 1


def test_a_resumed_run_estimates_only_what_it_has_not_sent(tmp_path):
    """The journal of a run that sent its first shard of three and was killed: the next
    run's estimate is of the two left (their requests, tokens and ceiling); the prices
    say their date, and how old they are."""
    job = load_job(job_file(tmp_path, generated_movies(30),
                            **{"limits.max_requests_per_shard": 10,
                               "request.max_tokens": 100}))
    whole = prepare_job(job)
    assert whole.unfinished is None and whole.estimate_left() == whole.estimate
    state, _ = RunState.open(Location(job.output), whole.job_key, job.config_hash(),
                             whole.fingerprint, {}, force=False)
    first = whole.shards[0]
    state.update(state.record(1, first.index, first.rows, first.bytes, "sha"),
                 batch_id="batch_sent_before", status="submitted")

    left = prepare_job(job).estimate_left()
    assert (left.requests, left.shards, left.already_sent) == (20, 2, 10)
    assert left.input_tokens == sum(s.tokens for s in whole.shards[1:])
    assert left.output_ceiling == 20 * 100
    printed = left.text()
    assert "already sent by the run this one resumes: 10" in printed
    age = (date.today() - date.fromisoformat(price_table()["checked"])).days
    assert f"checked {price_table()['checked']} ({age} days ago: prices may have changed" \
        in printed


def test_estimate_command_prints_the_figures(capsys):
    assert main(["estimate", "configs/movies.yaml", "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "requests to send:" in printed and "240" in printed
    assert "cost at batch prices:" in printed and "synchronous prices" in printed


def test_the_cap_stops_a_run_before_any_upload(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    path = job_file(tmp_path, generated_movies(50), max_cost_usd=0.000001)
    with pytest.raises(CostLimitError, match=r"may cost up to \$.*more than max_cost_usd "
                                             r"\$0\.0000010; nothing was uploaded"):
        enrich(str(path), base_url=server.base_url)
    client = sdk_client(server.base_url)
    assert client.files.list().data == [] and client.batches.list().data == []


def test_a_run_billed_more_than_its_estimate_stops_sending_at_the_cap(
        prefect_api, start_localbatch, tmp_path):
    """The local server counts a token for every 4 characters, where OpenAI's tokenizer
    reads ' information' as one token: the prompts are billed ~1.5 times the estimate, as
    with a provider whose tokenizer is not OpenAI's. Once what is paid leaves no room for
    the next shard, none is sent; the rows answered are written; a higher cap sends the
    rest, reusing those answered."""
    server = start_localbatch()
    rows = generated_movies(12).assign(Overview=" ".join(["information"] * 60))
    path = job_file(tmp_path, rows, price={"input": 100.0, "output": 0.0},
                    **{"limits.max_requests_per_shard": 2, "limits.max_shards_in_flight": 1})
    estimate = prepare_job(load_job(path)).estimate
    cap = estimate.batch_range()[1] * 1.5
    path = job_file(tmp_path, rows, price={"input": 100.0, "output": 0.0}, max_cost_usd=cap,
                    **{"limits.max_requests_per_shard": 2, "limits.max_shards_in_flight": 1})
    with pytest.raises(CostLimitError, match=r"max_cost_usd \$.* reached: \$.* paid, the next "
                                             r"shard \(2 rows\) may cost up to .*; the rows "
                                             r"answered are written"):
        enrich(str(path), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out")
    sent = data["_status"] == "ok"
    assert 0 < sent.sum() < 12 and sent.sum() % 2 == 0, data["_status"].tolist()
    assert (data.loc[~sent, "_error"] == NOT_SENT_FOR_THE_CAP).all()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["cost_cap_reached"].startswith("max_cost_usd")
    assert manifest["estimate_error"]["prompt_tokens"]["error"] > 0.4
    batches = len(sdk_client(server.base_url).batches.list().data)
    assert batches == sent.sum() // 2

    again = job_file(tmp_path, rows, price={"input": 100.0, "output": 0.0}, max_cost_usd=cap * 3,
                     **{"limits.max_requests_per_shard": 2, "limits.max_shards_in_flight": 1})
    rest = enrich(str(again), base_url=server.base_url)
    assert rest["rows_by_status"] == {"ok": 12} and rest["rows_reused"] == sent.sum()
    assert rest["cost_cap_reached"] is None


def test_a_resumed_run_s_cap_counts_what_it_paid_and_has_in_flight():
    price = price_for("gpt-4o-mini", PriceOverride(input=1_000_000, output=1_000_000))
    cap = CostCap(limit=10.0, price=price, output_ceiling=1)  # $0.5 a token at batch prices
    paid = ShardRecord(1, 0, 2, 0, "", batch_id="b0", status="collected", prompt_tokens=6,
                       completion_tokens=2)  # $4
    flying = ShardRecord(1, 1, 2, 0, "", batch_id="b1", status="submitted", tokens=4)  # $3
    state = RunState("job", "config", "data", shards=[paid, flying])
    assert (cap.paid(state), cap.in_flight(state)) == (4.0, 3.0)
    following = ShardRecord(1, 2, 2, 0, "", tokens=5)
    assert not cap.allows(state, following), "$4 paid + $3 in flight + $3.5 > $10"
    assert cap.allows(state, flying), "a batch created already is watched on"
    left = Estimate(model="gpt-4o-mini", rows=6, not_sent=0, reused=0, requests=2, shards=1,
                    input_tokens=5, output_ceiling=2, price=price)
    with pytest.raises(CostLimitError, match=r"may cost up to \$10\.5000 \(\$7\.0000 paid or "
                                             r"in flight for the run this one resumes"):
        cap.check(left, state)
    cap.check(left, None)  # $3.5 alone fits


def test_a_rerun_pays_only_for_new_or_changed_requests(prefect_api, start_localbatch, tmp_path):
    server = start_localbatch()
    client = sdk_client(server.base_url)
    first = enrich(str(job_file(tmp_path, generated_movies(30))), base_url=server.base_url)
    assert first["rows_reused"] == 0 and first["cost_usd"] > 0

    grown = enrich(str(job_file(tmp_path, generated_movies(40))), base_url=server.base_url)
    newest = client.batches.list().data[0]
    assert newest.request_counts.total == 10 and grown["rows_reused"] == 30
    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 40 and (data["_status"] == "ok").all()
    assert data["_reused"].sum() == 30 and not data["_reused"].iloc[30:].any()
    assert (data.loc[data["_reused"], "_cost_usd"] == 0).all()
    assert data.loc[~data["_reused"], "_cost_usd"].gt(0).all()
    assert grown["cost_usd"] == pytest.approx(data["_cost_usd"].sum())

    changed = job_file(tmp_path, generated_movies(40),
                       **{"request.user": "Movie: {Series_Title}. {Overview}"})
    enrich(str(changed), base_url=server.base_url)
    assert client.batches.list().data[0].request_counts.total == 40

    enrich(str(job_file(tmp_path, generated_movies(41))), base_url=server.base_url,
           use_cache=False)
    assert client.batches.list().data[0].request_counts.total == 41


def test_kept_answers_are_found_wherever_they_are_in_the_cache(tmp_path):
    """A lookup starts where the last one found its last answer and stops once each hash
    has one: parts asked in or out of the cache's order, or scattered, get every answer
    kept, and none of an excluded batch."""
    hashes = [f"{i:064x}" for i in range(1000)]
    (tmp_path / "_cache").mkdir()
    pq.write_table(pa.table({
        HASH: hashes, "_answer": [f"answer {i}" for i in range(1000)],
        "_finish_reason": ["stop"] * 1000, "_batch_id": ["b1"] * 500 + ["b2"] * 500},
        schema=CACHED), tmp_path / DEFAULT_FILE, row_group_size=100)
    cache = AnswerCache.open(None, Location(str(tmp_path)), None, excluded=["b2"])
    for asked in (hashes[300:400], hashes[:100], hashes[100:200], hashes[450:550],
                  hashes[::7] + ["f" * 64], hashes[300:400] * 2):
        found = cache.answers_for(pa.array(asked)).to_pydict()
        expected = {h for h in asked if int(h, 16) < 500}
        assert sorted(found[HASH]) == sorted(expected)
        assert all(answer == f"answer {int(h, 16)}" for h, answer in
                   zip(found[HASH], found["_answer"], strict=True))


def test_a_run_killed_after_its_cache_before_its_output_still_counts_what_it_paid(
        prefect_api, start_localbatch, tmp_path):
    """The state such a kill leaves: answers in the cache, collected results journaled
    (kept: cleanup off), no data, no manifest, the journal unfinished. The re-run is the
    same run: it reuses nothing and counts the tokens its own batches used, which the
    provider billed."""
    server = start_localbatch()
    path = job_file(tmp_path, generated_movies(30), cleanup=False)
    paid = enrich(str(path), base_url=server.base_url)
    out = tmp_path / "out"
    (out / "part-00000.parquet").unlink()
    (out / "_manifest.json").unlink()
    journal = json.loads((out / "_state" / "run.json").read_text())
    (out / "_state" / "run.json").write_text(json.dumps({**journal, "finished_at": None}))

    again = enrich(str(path), base_url=server.base_url)
    assert len(sdk_client(server.base_url).batches.list().data) == 1, "nothing paid twice"
    assert again["rows_reused"] == 0 and again["run_id"] == paid["run_id"]
    assert again["tokens"] == paid["tokens"] and again["cost_usd"] == paid["cost_usd"]
    assert not pd.read_parquet(out)["_reused"].any()


def test_the_enqueued_token_budget_is_respected_and_learned(prefect_api, start_localbatch,
                                                            tmp_path):
    rows = generated_movies(120)
    path = job_file(tmp_path, rows, **{"limits.max_requests_per_shard": 20})
    per_shard = prepare_job(load_job(path)).shards[0].tokens
    limit = int(per_shard * 2.5)  # room for two shards at a time, not three
    server = start_localbatch(Simulation(enqueued_token_limits={"gpt-4o-mini": limit},
                                         requests_per_second=40))
    manifest = enrich(str(path), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all()
    assert not data["_error"].fillna("").str.contains("token_limit_exceeded").any()
    batches = list(sdk_client(server.base_url).batches.list(limit=100))
    refused = [b for b in batches if b.status == "failed"]
    assert refused and all(b.errors.data[0].code == "token_limit_exceeded" for b in refused)
    assert sum(b.request_counts.completed for b in batches) == 120
    assert manifest["attempts"] == 1


def test_a_tight_token_limit_cuts_shards_smaller_instead_of_failing_rows(
        prefect_api, start_localbatch, tmp_path):
    """3,000 rows under a 30,000-token limit that the provider counts a little differently
    than our estimate: refused shards are cut smaller, no row fails, no attempt is spent."""
    server = start_localbatch(Simulation(enqueued_token_limits={"gpt-4o-mini": 30_000}))
    path = job_file(tmp_path, generated_movies(3_000), cleanup=False,  # results kept: see below
                    **{"limits.max_attempts": 1})
    manifest = enrich(str(path), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out")
    assert len(data) == 3_000 and (data["_status"] == "ok").all()
    assert (data["_attempts"] == 1).all() and manifest["attempts"] == 1
    batches = list(sdk_client(server.base_url).batches.list(limit=100))
    done = [b for b in batches if b.status == "completed"]
    assert sum(b.request_counts.completed for b in done) == 3_000, "every row sent once"
    refused = [b for b in batches if b.status == "failed"]
    assert all(b.errors.data[0].code == "token_limit_exceeded" for b in refused)
    assert len(refused) <= 2, "the limit is learned from the first refusal"

    # resumed from its journal (killed before its output), the run finds the cut shards
    out = tmp_path / "out"
    (out / "part-00000.parquet").unlink()
    (out / "_manifest.json").unlink()
    journal = json.loads((out / "_state" / "run.json").read_text())
    assert any(s["status"] == "split" for s in journal["shards"])
    (out / "_state" / "run.json").write_text(json.dumps({**journal, "finished_at": None}))
    again = enrich(str(path), base_url=server.base_url)
    assert len(list(sdk_client(server.base_url).batches.list(limit=100))) == len(batches)
    assert again["rows_by_status"] == {"ok": 3_000} and again["tokens"] == manifest["tokens"]
