#!/usr/bin/env bash
# openai-batch's command line (`python -m openai_batch.run`), unchanged: a 20-request file
# run to the end against a Batch API at $BASE_URL. It polls once a minute.
set -euo pipefail
python="$1"
work="$(mktemp -d)"
"$python" - "$work/in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as handle:
    for i in range(20):
        handle.write(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                                 "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "messages": [
                                     {"role": "user", "content": f"Tell me about owl {i}"}]}}) + "\n")
PY
"$python" -m openai_batch.run "$work/in.jsonl" --base-url "$BASE_URL" --api-key local \
    -o "$work/out.jsonl" -e "$work/err.jsonl" > "$work/log" 2>&1
test "$(wc -l < "$work/out.jsonl")" -eq 20
echo "openai-batch: 20 of 20 answered ($(grep -c '"status_code":200' "$work/out.jsonl") with HTTP 200)"
