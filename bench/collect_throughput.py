"""How fast collect and merge turn a batch output file into enriched rows.

A movies batch's output file is made with the mock engine; the baseline is the OpenAI
cookbook's loop, measured in the same run: `json.loads` of each line and of its answer,
a dict by `custom_id`, and a lookup of each row's answer to fill its columns. Ours reads
the file with Arrow, checks each answer against the schema and merges the typed answers
into the rows. Prints rows per second of each (the better of two runs) and their ratio
(goal: 10x), and checks that both give the same answers.

    .venv/bin/python bench/collect_throughput.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from enrichflow.config import load_job
from enrichflow.tasks.collect import read_result_lines, results_of_lines
from enrichflow.tasks.load import KEY, ROW
from enrichflow.tasks.merge import merge_part
from enrichflow.tasks.render import custom_ids
from enrichflow.tasks.state import ATTEMPT
from localbatch.engines import MockEngine

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
from make_movies import movies  # noqa: E402


def output_file(table: pa.Table, job, path: Path) -> None:
    """What the Batch API returns for the movies job, in another order than asked."""
    engine = MockEngine()
    ids = custom_ids(table[KEY], "bench").to_pylist()
    body = {"model": job.request.model, **job.request.body_parameters()}
    with path.open("w") as handle:
        for i in reversed(range(table.num_rows)):
            messages = [{"role": "user", "content": table["Overview"][i].as_py()}]
            status, answer = engine.answer(job.request.endpoint, {**body, "messages": messages})
            handle.write(json.dumps({
                "id": f"batch_req_{i}", "custom_id": ids[i], "error": None,
                "response": {"status_code": status, "request_id": f"req_{i}", "body": answer},
            }) + "\n")


def cookbook(path: Path, ids: list[str]) -> dict[str, list]:
    answers = {}
    with path.open() as handle:
        for line in handle:
            result = json.loads(line)
            content = result["response"]["body"]["choices"][0]["message"]["content"]
            answers[result["custom_id"]] = json.loads(content)
    return {"categories": [answers[i]["categories"] for i in ids],
            "summary": [answers[i]["summary"] for i in ids]}


def ours(path: Path, table: pa.Table, ids: pa.Array, job) -> pa.Table:
    results = results_of_lines(read_result_lines(str(path)), "batch_bench", table[ROW], ids,
                               job.request)
    results = results.append_column(ATTEMPT, pa.array([1] * results.num_rows, pa.int64()))
    unsent = pa.table({ROW: pa.array([], pa.int64()), "_status": pa.array([], pa.string()),
                       "_error": pa.array([], pa.string())})
    return merge_part(table, "bench", results, unsent, job.request)


def best_of_two(work) -> tuple[float, object]:
    """Seconds of the faster of two runs of `work`, and what it returned."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        value = work()
        times.append(time.perf_counter() - started)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    job = load_job("configs/movies.yaml")
    table = pa.Table.from_pylist(movies(args.rows))
    table = table.append_column(KEY, table["Series_Title"]).append_column(
        ROW, pa.array(range(args.rows), pa.int64()))
    ids = custom_ids(table[KEY], "bench").combine_chunks()
    path = Path(tempfile.mkdtemp()) / "output.jsonl"
    output_file(table, job, path)

    loop, expected = best_of_two(lambda: cookbook(path, ids.to_pylist()))
    arrow, merged = best_of_two(lambda: ours(path, table, ids, job))

    assert pc.all(pc.equal(merged["_status"], "ok")).as_py()
    assert merged["categories"].to_pylist() == expected["categories"]
    assert merged["summary"].to_pylist() == expected["summary"]
    print(f"rows:                             {args.rows:,}")
    print(f"cookbook loop (json.loads, dict): {args.rows / loop:,.0f} rows/s")
    print(f"collect + merge, column-wise:     {args.rows / arrow:,.0f} rows/s")
    print(f"collect + merge / cookbook:       {loop / arrow:.1f}x  (goal 10x)")


if __name__ == "__main__":
    main()
