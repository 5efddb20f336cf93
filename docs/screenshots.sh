#!/usr/bin/env bash
# Screenshots of the Prefect UI for docs/prefect.md, taken as a user sees it: a real Prefect
# server with its scheduler, the deployments of prefect.yaml, a worker, one movies run on
# a local Batch API server and one furniture run whose provider is unreachable, then
# headless Chromium on the run page, three of its artifacts, the failed run's cause, the
# deployment's run form (submitted as it opens: its defaults must pass the server's
# checks) and its upcoming (scheduled) runs. Needs Debian's chromium (apt-get install
# chromium) and `make install`.
#   bash docs/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
PORT=${PORT:-$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
WORK=$(mktemp -d)
export PREFECT_HOME=$WORK/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:$PORT/api PREFECT_WORKER_QUERY_SECONDS=2
pids=()
# the worker may hang in its shutdown once its server is gone: what is left after 5 s is killed
trap 'kill "${pids[@]}" 2>/dev/null; sleep 5; kill -9 "${pids[@]}" 2>/dev/null; rm -rf "$WORK"' EXIT

"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
pids+=($!)
"$BIN/enrichflow" serve --port 0 --data-dir "$WORK/localbatch" > "$WORK/serve.log" 2>&1 &
pids+=($!)
until curl -sf "$PREFECT_API_URL/health" > /dev/null; do sleep 1; done
BASE_URL=$(until grep -o 'http://[^ ,]*' "$WORK/serve.log"; do sleep 0.5; done)

"$BIN/prefect" work-pool create enrich-pool --type process > /dev/null
"$BIN/prefect" deploy --all > /dev/null
"$BIN/prefect" worker start --pool enrich-pool > "$WORK/worker.log" 2>&1 &
pids+=($!)
RUN=$("$BIN/prefect" deployment run enrich/movies --param limit=20 \
      --param "output=$WORK/movies" --param "base_url=$BASE_URL" | grep -o 'UUID: [0-9a-f-]*' | cut -c7-)
state() { curl -sf "$PREFECT_API_URL/flow_runs/$1" | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["state"]["type"])'; }
until [ "$(state "$RUN")" = COMPLETED ]; do
  case "$(state "$RUN")" in FAILED|CRASHED|CANCELLED) echo "the run ended $(state "$RUN")" >&2; exit 1;; esac
  sleep 2
done
# nothing listens on port 9 of loopback: the run fails at its first call to the provider
FAILED_RUN=$("$BIN/prefect" deployment run enrich/furniture --param limit=3 \
      --param "output=$WORK/furniture" --param base_url=http://127.0.0.1:9/v1 | grep -o 'UUID: [0-9a-f-]*' | cut -c7-)
until [ "$(state "$FAILED_RUN")" = FAILED ]; do
  case "$(state "$FAILED_RUN")" in COMPLETED|CRASHED|CANCELLED) echo "the failing run ended $(state "$FAILED_RUN")" >&2; exit 1;; esac
  sleep 2
done
DEPLOYMENT=$(curl -sf "$PREFECT_API_URL/deployments/name/enrich/movies" | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
FORM=http://127.0.0.1:$PORT/deployments/deployment/$DEPLOYMENT/run

shot() {  # shot NAME PATH: a 1600x1000 screenshot of the UI page at PATH
  chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size=1600,1000 --virtual-time-budget=20000 \
    --screenshot="docs/$1.png" "http://127.0.0.1:$PORT$2" 2> /dev/null
}
shot run-page "/runs/flow-run/$RUN"
"$BIN/python" docs/click_and_shoot.py "http://127.0.0.1:$PORT/runs/flow-run/$RUN" \
  docs/run-artifacts.png Artifacts
"$BIN/python" docs/click_and_shoot.py "http://127.0.0.1:$PORT/runs/flow-run/$FAILED_RUN" \
  docs/failed-run.png Details "See More"
artifact() {  # the id of this run's artifact with key $1
  curl -sf -X POST "$PREFECT_API_URL/artifacts/filter" -H 'content-type: application/json' \
    -d "{\"artifacts\": {\"key\": {\"any_\": [\"$1\"]}, \"flow_run_id\": {\"any_\": [\"$RUN\"]}}}" \
    | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])'
}
shot rows-artifact "/artifacts/artifact/$(artifact movies-rows)"
shot summary-artifact "/artifacts/artifact/$(artifact movies-summary)"
shot canary-artifact "/artifacts/artifact/$(artifact movies-canary)"
# through DevTools with no click: the page has settled when it is shot
"$BIN/python" docs/click_and_shoot.py "$FORM" docs/run-form.png
runs() {  # the deployment's runs, but for those its schedule made
  curl -sf -X POST "$PREFECT_API_URL/flow_runs/filter" -H 'content-type: application/json' \
    -d "{\"deployments\": {\"id\": {\"any_\": [\"$DEPLOYMENT\"]}}}" \
    | "$BIN/python" -c 'import json,sys; print(sum("auto-scheduled" not in r["tags"] for r in json.load(sys.stdin)))'
}
BEFORE=$(runs)
for attempt in 1 2 3; do  # a submit met "Something went wrong" once; the UI does not retry
  "$BIN/python" docs/click_and_shoot.py "$FORM" docs/run-form-submitted.png Submit
  [ "$(runs)" -gt "$BEFORE" ] && break
  [ "$attempt" = 3 ] && { echo "the run form, submitted untouched, made no run" >&2; exit 1; }
done
shot upcoming-runs "/deployments/deployment/$DEPLOYMENT?tab=Upcoming"
ls docs/*.png
