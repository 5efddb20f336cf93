"""How fast the local server completes a 50,000-request batch with the mock engine.

Prints requests per second from `batches.create` to `completed` (goal: at least 5,000 on a
2-core machine), the server process's peak memory, and, as the baseline measured in the
same run, the mock engine answering the same requests in a plain loop with no server:
the ratio says what the lifecycle, the files and the bookkeeping cost.

    .venv/bin/python bench/localbatch_throughput.py [--requests 50000]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from localbatch.engines import MockEngine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["categories", "summary"],
          "properties": {"categories": {"type": "array", "items": {"type": "string"}},
                         "summary": {"type": "string"}}}


def request_lines(count: int) -> list[str]:
    return [json.dumps({
        "custom_id": f"movie-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "max_tokens": 200,
                 "response_format": {"type": "json_schema",
                                     "json_schema": {"name": "m", "strict": True,
                                                     "schema": SCHEMA}},
                 "messages": [{"role": "system", "content": "Categorise the movie."},
                              {"role": "user", "content": f"Movie {i}: a retired detective "
                               "returns to the coastal town where her sister vanished."}]},
    }) for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    lines = request_lines(args.requests)

    engine = MockEngine()
    started = time.perf_counter()
    engine.run([("/v1/chat/completions", json.loads(line)["body"]) for line in lines])
    baseline = args.requests / (time.perf_counter() - started)

    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen([sys.executable, "-m", "enrichflow.cli", "serve", "--port",
                                   str(port), "--data-dir", data_dir], stdout=subprocess.DEVNULL)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench",
                            max_retries=10)
            file = client.files.create(file=("bench.jsonl", "\n".join(lines).encode()),
                                       purpose="batch")
            started = time.perf_counter()
            batch = client.batches.create(input_file_id=file.id, completion_window="24h",
                                          endpoint="/v1/chat/completions")
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.05)
                batch = client.batches.retrieve(batch.id)
            elapsed = time.perf_counter() - started
            peak = peak_rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait()

    assert batch.status == "completed", batch.status
    served = args.requests / elapsed
    print(f"requests:                 {args.requests:,}")
    print(f"server, create->complete: {elapsed:.2f} s = {served:,.0f} requests/s (goal 5,000)")
    print(f"baseline, engine loop:    {baseline:,.0f} requests/s")
    print(f"server / baseline:        {served / baseline:.2f}")
    print(f"server peak memory:       {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
