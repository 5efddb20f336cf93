#!/usr/bin/env bash
# Third-party Batch API clients, each in a virtualenv of its own with the version pinned
# here, run unchanged against `enrichflow serve`. Not part of `make test`: it installs
# from the package registry and takes a few minutes (openai-batch polls once a minute).
# batchor needs Python 3.12 (PYTHON312, default python3.12).
set -euo pipefail
shopt -s inherit_errexit
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${THIRD_PARTY_WORK:-$repo/.third-party}"
mkdir -p "$work"

venv() {  # venv NAME PYTHON PACKAGE...: a virtualenv with the packages, made once
    local dir="$work/$1" python="$2"; shift 2
    if [ ! -x "$dir/bin/python" ]; then
        "$python" -m venv "$dir"
        "$dir/bin/pip" install --quiet --upgrade pip
        "$dir/bin/pip" install --quiet "$@"
    fi
    echo "$dir/bin/python"
}

# curator's Anthropic batch backend calls instructor.handle_response_model, gone after 1.9
curator="$(venv curator python3 'bespokelabs-curator==0.1.31' 'instructor==1.9.2')"
# openai-batch imports httpx, which the openai SDK 3 no longer brings: it runs on SDK 2
openai_batch="$(venv openai-batch python3 'openai-batch==0.3.4' 'openai<3')"
batchor="$(venv batchor "${PYTHON312:-python3.12}" 'batchor==0.0.7')"

port="$("$repo/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$repo/.venv/bin/enrichflow" serve --port "$port" --data-dir "$work/serve-$port" \
    > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
export BASE_URL="http://127.0.0.1:$port/v1" OPENAI_BASE_URL="http://127.0.0.1:$port/v1"
export OPENAI_API_KEY=local ANTHROPIC_BASE_URL="http://127.0.0.1:$port" ANTHROPIC_API_KEY=local
for _ in $(seq 60); do curl -sf "$BASE_URL/models" > /dev/null && break; sleep 0.5; done

cd "$work"
HOME="$work/home" CURATOR_DISABLE_CACHE=1 TELEMETRY_ENABLED=0 "$curator" "$here/curator_basic.py"
HOME="$work/home" CURATOR_DISABLE_CACHE=1 TELEMETRY_ENABLED=0 "$curator" \
    "$here/curator_anthropic_batch.py"
"$batchor" "$here/batchor_basic.py"
"$here/openai_batch_basic.sh" "$openai_batch"
