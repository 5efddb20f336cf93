"""`enrichflow.enrich()` as a notebook user meets it: wall time of the first call in a
fresh process (imports and the start of the process's Prefect server included), of the
same call again (nothing sent) and of a call with 1 % new rows, on tables of each size,
against the embedded mock server. Prints the figures and each size's ratio of the first
call to the baseline: the same job through `enrichflow run` (the CLI), measured here.

    .venv/bin/python bench/python_api.py [--rows 10,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
USER = "Title: {Series_Title}\nOverview: {Overview}"
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["categories", "summary"],
          "properties": {"categories": {"type": "array", "items": {"type": "string"}},
                         "summary": {"type": "string"}}}

CALLS = """
import json, sys, time
started = time.monotonic()
import pandas as pd
import enrichflow
movies = pd.read_parquet(sys.argv[1])
settings = dict(user=sys.argv[3], model="gpt-4o-mini", schema=json.loads(sys.argv[4]),
                workdir=sys.argv[2], progress=False)
figures = []
for table in (movies, movies, pd.concat([movies, movies.head(max(1, len(movies) // 100))
                                         .assign(Overview="changed")], ignore_index=True)):
    start = time.monotonic()
    enriched = enrichflow.enrich(table, **settings)
    assert (enriched["_status"] == "ok").all() and len(enriched) == len(table)
    figures.append(time.monotonic() - (started if not figures else start))
print(*figures)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10,10000")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import generated_movies

    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",
                                                             "PREFECT_API_URL")}
    print(f"{'rows':>8} {'first call':>11} {'again':>7} {'+1 % rows':>10} {'CLI run':>8} "
          f"{'first/CLI':>10}")
    for rows in [int(r) for r in args.rows.split(",")]:
        with tempfile.TemporaryDirectory() as work:
            table = Path(work) / "movies.parquet"
            generated_movies(rows).to_parquet(table, index=False)
            out = subprocess.run([sys.executable, "-c", CALLS, str(table), f"{work}/api", USER,
                                  json.dumps(SCHEMA)],
                                 env=env, cwd=work, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            first, again, grown = (float(f) for f in out.stdout.split())
            job = Path(work) / "job.yaml"  # the same job as a job file
            job.write_text(yaml.safe_dump({
                "name": "dataframe", "dataset": {"path": str(table)}, "output": f"{work}/cli",
                "request": {"model": "gpt-4o-mini", "user": USER, "response_format": {
                    "type": "json_schema", "schema": SCHEMA}}}))
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "enrichflow", "run", str(job)], env=env,
                           cwd=work, check=True, capture_output=True)
            cli = time.monotonic() - start
        print(f"{rows:>8,} {first:>10.1f}s {again:>6.1f}s {grown:>9.1f}s {cli:>7.1f}s "
              f"{first / cli:>9.2f}x")


if __name__ == "__main__":
    main()
