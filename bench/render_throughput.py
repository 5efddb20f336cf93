"""How fast render turns rows into Batch API JSONL, against the obvious per-row loop.

Both sides render the movies job's request for the same generated rows; the baseline is
`str.format` plus `json.dumps` of a dict per row, measured in the same run. Prints rows
per second of each, their ratio, and checks that both produce the same requests.

    .venv/bin/python bench/render_throughput.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow as pa

from enrichflow.config import load_job
from tasks.load import KEY
from tasks.render import render_requests


def rows(count: int) -> pa.Table:
    return pa.table({
        "Series_Title": [f"Movie {i}" for i in range(count)],
        "Released_Year": [1950 + i % 70 for i in range(count)],
        "Genre": ["Drama, Crime" if i % 2 else "Comedy" for i in range(count)],
        "Overview": [f'A detective {i} returns to the "coastal" town\nwhere her sister vanished.'
                     for i in range(count)],
        KEY: [str(i) for i in range(count)],
    })


def baseline(table: pa.Table, request, tag: str) -> list[str]:
    body = request.body_parameters()
    lines = []
    for row in table.to_pylist():
        messages = [{"role": "system", "content": request.system},
                    {"role": "user", "content": request.user.format(**row)}]
        lines.append(json.dumps({"custom_id": f"{tag}-{row[KEY]}", "method": "POST",
                                 "url": request.endpoint,
                                 "body": {**body, "messages": messages}},
                                ensure_ascii=False, separators=(",", ":")))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    request = load_job("configs/movies.yaml").request
    table = rows(args.rows)

    started = time.perf_counter()
    expected = baseline(table, request, "bench")
    loop = args.rows / (time.perf_counter() - started)

    started = time.perf_counter()
    rendered = render_requests(table, request, "bench")
    arrow = args.rows / (time.perf_counter() - started)

    sample = range(0, args.rows, max(1, args.rows // 1000))
    lines = rendered.requests["_line"]
    assert all(json.loads(lines[i].as_py()) == json.loads(expected[i]) for i in sample)
    print(f"rows:                 {args.rows:,}")
    print(f"baseline, per-row:    {loop:,.0f} rows/s")
    print(f"render, column-wise:  {arrow:,.0f} rows/s")
    print(f"render / baseline:    {arrow / loop:.1f}x")


if __name__ == "__main__":
    main()
