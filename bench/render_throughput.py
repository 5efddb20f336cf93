"""How fast prepare turns rows into a Batch API JSONL file and counts its tokens.

Both sides render the movies job's request for the same generated movies and write the
JSONL file; the baseline is the OpenAI cookbook's loop (`DataFrame.iterrows`, a dict per
row, `json.dumps`, a line written per row), measured in the same run. Prints rows per
second of each (the better of two runs) and their ratio (goal: 25x), the token count's
rows per second (goal: 50,000) and checks that both sides wrote the same requests.

    .venv/bin/python bench/render_throughput.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

from enrichflow.config import load_job
from enrichflow.tasks.estimate import request_tokens
from enrichflow.tasks.load import KEY, ROW
from enrichflow.tasks.plan import jsonl
from enrichflow.tasks.render import render_requests

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
from make_movies import movies  # noqa: E402


def cookbook(frame: pd.DataFrame, request, tag: str, path: Path) -> None:
    body = request.body_parameters()
    with path.open("w", encoding="utf-8") as handle:
        for _, row in frame.iterrows():
            task = {"custom_id": f"{tag}-{row['Series_Title']}", "method": "POST",
                    "url": request.endpoint,
                    "body": {**body, "messages": [
                        {"role": "system", "content": request.system},
                        {"role": "user", "content": request.user.format(**row)}]}}
            handle.write(json.dumps(task, ensure_ascii=False, separators=(",", ":")) + "\n")


def best_of_two(work) -> float:
    """Seconds of the faster of two runs of `work`."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    request = load_job("configs/movies.yaml").request
    frame = pd.DataFrame(movies(args.rows))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column(KEY, table["Series_Title"].cast(pa.string())).append_column(
        ROW, pa.array(range(args.rows), pa.int64()))
    scratch = Path(tempfile.mkdtemp())

    def render() -> pa.Table:
        requests = render_requests(table, request, "bench").requests
        (scratch / "render.jsonl").write_bytes(jsonl(requests))
        return requests

    loop = args.rows / best_of_two(lambda: cookbook(frame, request, "bench",
                                                    scratch / "cookbook.jsonl"))
    arrow = args.rows / best_of_two(render)
    requests = render_requests(table, request, "bench").requests
    counted = args.rows / best_of_two(lambda: request_tokens(requests, request))

    ours = (scratch / "render.jsonl").read_text().splitlines()
    theirs = (scratch / "cookbook.jsonl").read_text().splitlines()
    step = max(1, args.rows // 1000)
    assert all(json.loads(ours[i]) == json.loads(theirs[i]) for i in range(0, args.rows, step))
    print(f"rows:                        {args.rows:,}")
    print(f"cookbook loop, to a file:    {loop:,.0f} rows/s")
    print(f"render, column-wise:         {arrow:,.0f} rows/s")
    print(f"render / cookbook:           {arrow / loop:.1f}x  (goal 25x)")
    print(f"token count:                 {counted:,.0f} rows/s  (goal 50,000)")


if __name__ == "__main__":
    main()
