"""The Python API: enrich a DataFrame in one call, or build, run, estimate, preview,
look at and cancel jobs, from a notebook or a script.

    import enrichflow
    df = enrichflow.enrich(movies, user="Categorise: {Overview}", model="gpt-4o-mini",
                           schema=Categories)

Every call runs the very `enrich` flow the CLI and the deployments run, so a DataFrame
job is journaled, leased, cached and resumed like a job file's. A job built from data
keeps its state in a working folder (default: the user's cache directory, or
$ENRICHFLOW_WORKDIR; a local path or s3:// URI): one folder per job's settings, holding
the answer cache its runs share, and one run folder per table (its rows, as Parquet,
and its output with the journal). Running the same cell again finds the same run folder
and pays nothing twice; a changed table is a new run that reuses every answer it can.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from enrichflow.config import DatasetConfig, Job, RequestConfig, validate_job
from enrichflow.local_prefect import on_a_prefect_server, set_defaults, start_own_server
from enrichflow.storage import Location

if TYPE_CHECKING:
    import pandas as pd

    from enrichflow.tasks.estimate import Estimate
    from enrichflow.tasks.status import Status

    Data = pd.DataFrame | pa.Table | str | os.PathLike[str]

WORKDIR_VARIABLE = "ENRICHFLOW_WORKDIR"
RUNS, CACHE_FILE, INPUT_FILE, OUTPUT = "runs", "answers.parquet", "input.parquet", "output"
DATASET_SETTINGS = set(DatasetConfig.model_fields) - {"path"}
REQUEST_SETTINGS = set(RequestConfig.model_fields) - {"response_format"}
JOB_SETTINGS = set(Job.model_fields) - {"dataset", "request"}


def default_workdir() -> str:
    """Where jobs built from data keep their state: $ENRICHFLOW_WORKDIR, else the
    user's cache directory (~/.cache/enrichflow on Linux)."""
    import platformdirs

    return os.environ.get(WORKDIR_VARIABLE) or platformdirs.user_cache_dir("enrichflow")


def make_job(data: Data | None = None, *, job: Job | None = None,
             workdir: str | None = None, **settings: Any) -> Job:
    """The job that enriches `data` (a pandas DataFrame, a pyarrow Table, or a path or
    URI a job file takes) with `settings`: any field of a job file by its name (`user`,
    `system`, `model`, `schema`, `max_tokens`, `id_column`, `limit`, `canary`,
    `max_cost_usd`, `limits`, `provider`, ...), on top of `job` if given. `schema` is a
    Pydantic model class, a JSON-schema dict, or None (text answers). Unless `output`
    is set, the job keeps its output and state under `workdir` (see the module)."""
    raw = job.model_dump(mode="json", by_alias=True, exclude_unset=True) if job else {}
    for name, value in settings.items():
        _place(raw, name, value)
    if data is None:
        if "path" not in raw.get("dataset", {}):
            raise TypeError("give the rows: a DataFrame, a pyarrow Table, a path or URI, "
                            "or a job whose dataset has a path")
        return validate_job(raw, f"job {raw.get('name', '')!r}")
    raw.setdefault("name", "dataframe" if isinstance(data, pa.Table) or _is_frame(data)
                   else Path(str(data)).stem or "dataset")
    dataset = {**raw.get("dataset", {}), "path": "(the data)"}
    check = validate_job({"output": "(the workdir)", **raw, "dataset": dataset},
                         f"job {raw['name']!r}")  # before anything is written
    root = Location(workdir or default_workdir(), check.storage_options)
    decisive = check.model_dump(mode="json", by_alias=True, include={"name", "request"})
    decisive["dataset"] = check.dataset.model_dump(mode="json", exclude={"path"})
    folder = f"{check.name}-{_digest(decisive)[:12]}"
    if isinstance(data, str | os.PathLike):  # a local path stands for itself from anywhere
        dataset["path"] = str(data) if "://" in str(data) else os.path.abspath(data)
        run_folder = f"{folder}/{RUNS}/{_digest(dataset['path'])[:16]}"
    else:
        table = data if isinstance(data, pa.Table) else _arrow(data)
        run_folder = f"{folder}/{RUNS}/{_store_table(table, root, folder)}"
        dataset["path"] = f"{root.uri}/{run_folder}/{INPUT_FILE}"
    raw["dataset"] = dataset
    raw.setdefault("output", f"{root.uri}/{run_folder}/{OUTPUT}")
    raw.setdefault("cache", {}).setdefault("uri", f"{root.uri}/{folder}/{CACHE_FILE}")
    return validate_job(raw, f"job {raw['name']!r}")


def enrich(data: Data, *, job: Job | None = None, workdir: str | None = None,
           force: bool = False, use_cache: bool = True, progress: bool = True,
           **settings: Any) -> pd.DataFrame:
    """Enrich `data` and return it with the answer's columns, `_status`, `_error` and
    the cost columns, as the Parquet output holds them. Takes the settings of
    `make_job` (`user`, `model`, `schema`, ...). Calling it again with the same
    data and settings re-attaches to its run: nothing is paid twice."""
    built = make_job(data, job=job, workdir=workdir, **settings)
    return run(built, force=force, use_cache=use_cache, progress=progress).to_pandas()


def run(job: Job, *, force: bool = False, use_cache: bool = True, wait_for_lock: bool = True,
        progress: bool = True) -> Result:
    """Run `job` through the `enrich` flow (a flow run on the Prefect server
    PREFECT_API_URL names, else on a local one started for this process) and return its
    result. While it waits, a progress bar shows the requests done. Interrupting it
    (Ctrl-C, the kernel's stop button) leaves its batches running at the provider:
    running the same job again collects them without paying twice, and
    `enrichflow.cancel(job)` stops them."""
    from enrichflow.tasks.preflight import preflight
    from enrichflow.tasks.status import already_complete

    done = None if force else already_complete(job)  # told without Prefect
    if done:
        return Result(done, job.storage_options)
    set_defaults()
    start_own_server()  # it starts while the pre-flight runs
    preflight(job)  # its errors in seconds, before Prefect starts

    from enrichflow.flows.enrich import enrich as enrich_flow
    from enrichflow.progress import ProgressBar
    from enrichflow.tasks import watch

    bar = ProgressBar(job.name)
    with on_a_prefect_server(), (watch.watching(bar) if progress else nullcontext()), \
            closing(bar), _interrupt_said(job):
        manifest = enrich_flow(job=job.to_yaml(), force=force, use_cache=use_cache,
                               wait_for_lock=wait_for_lock)
        bar.finished()
    return Result(manifest, job.storage_options)


def estimate(data: Data | Job | None = None, *, use_cache: bool = True,
             **settings: Any) -> Estimate:
    """Rows, tokens and cost of a job (or of `make_job`'s data and settings), before
    sending anything (of what is left, when a run of it was interrupted); a table in
    Jupyter."""
    from enrichflow.tasks.prepare import prepare_job

    return prepare_job(_job_of(data, settings), use_cache=use_cache).estimate_left()


def preview(data: Data | Job | None = None, *, rows: int = 3,
            **settings: Any) -> list[dict[str, Any]]:
    """The requests of the first `rows` rows, as they would be sent; nothing is sent."""
    from enrichflow.tasks.preflight import preview_lines

    return [orjson.loads(line) for line in preview_lines(_job_of(data, settings), rows)]


def status(target: Job | str, storage_options: dict[str, Any] | None = None) -> Status | None:
    """What a job's output (or an output URI) says: complete, or its run's batches;
    None when nothing of enrichflow is there."""
    from enrichflow.tasks.status import run_status

    return run_status(_output_of(target, storage_options))


def cancel(target: Job | str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Cancel the unfinished batches of a job's run (or of an output URI's); the ids of
    the batches cancelled. Finished answers stay billed and are kept."""
    from enrichflow.tasks.cancel import cancel_run

    return cancel_run(_output_of(target, storage_options))[1]


def workdirs(workdir: str | None = None,
             storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The job folders under `workdir`: their runs, bytes and last change, oldest first;
    remove a folder (`shutil.rmtree`, `fs.rm`) to forget a job and its answers."""
    import pandas as pd

    root = Location(workdir or default_workdir(), storage_options)
    folders = []
    for entry in root.fs.ls(root.root, detail=True) if root.fs.exists(root.root) else []:
        if entry["type"] != "directory" or entry["name"].rsplit("/", 1)[-1].startswith("_"):
            continue  # _staging: files on their way in
        files = root.fs.find(entry["name"], detail=True).values()
        folders.append({"job": entry["name"].rsplit("/", 1)[-1],
                        "runs": len(root.fs.ls(f"{entry['name']}/{RUNS}"))
                        if root.fs.exists(f"{entry['name']}/{RUNS}") else 0,
                        "bytes": sum(f["size"] for f in files),
                        "changed": pd.to_datetime(max((_mtime(f) for f in files), default=0),
                                                  unit="s", utc=True),
                        "path": root.fs.unstrip_protocol(entry["name"])})
    return pd.DataFrame(folders, columns=["job", "runs", "bytes", "changed", "path"]
                        ).sort_values("changed", ignore_index=True)


@dataclass(frozen=True)
class Result:
    """A finished run: its manifest (rows by status, tokens, cost, output, batches) and
    its enriched rows."""

    manifest: dict[str, Any]
    storage_options: dict[str, Any]

    @property
    def output(self) -> str:
        return self.manifest["output"]

    def to_pandas(self) -> pd.DataFrame:
        return self.to_arrow().to_pandas()

    def to_arrow(self) -> pa.Table:
        from enrichflow.tasks.write import part_name

        output = Location(self.output, self.storage_options)
        return pa.concat_tables([output.read_parquet(part_name(index))
                                 for index in range(self.manifest["parts"])])

    def summary(self) -> list[tuple[str, str]]:
        from enrichflow.provider import answered_by, cost_text

        manifest = self.manifest
        return [("output", manifest["output"]),
                ("rows", ", ".join(f"{n:,} {s}" for s, n in manifest["rows_by_status"].items())),
                ("rows reused from earlier runs", f"{manifest['rows_reused']:,}"),
                ("batches", f"{sum(1 for s in manifest['shards'] if s['batch_id'])}"),
                ("tokens", f"{manifest['tokens']['prompt']:,} prompt, "
                           f"{manifest['tokens']['completion']:,} completion"),
                ("cost", cost_text(manifest["cost_usd"], manifest["provider"])),
                ("answered by", answered_by(manifest["provider"]))]

    def _repr_html_(self) -> str:
        import pandas as pd

        return pd.DataFrame(self.summary(), columns=["run", self.manifest["job"]]
                            ).to_html(index=False)

    def __str__(self) -> str:
        return "\n".join(f"{label}: {value}" for label, value in self.summary())


class Interrupted(KeyboardInterrupt):
    """A run stopped by the user; its message says what runs on and how to go on.
    Jupyter shows it as that one line, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


@contextmanager
def _interrupt_said(job: Job) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt as exc:
        from enrichflow.tasks.status import what_runs_on

        raise Interrupted(what_runs_on(Location(job.output, job.storage_options), job)) from exc


def _place(raw: dict[str, Any], name: str, value: Any) -> None:
    """Put the keyword `name` where the job file has it."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if name == "schema":
        raw.setdefault("request", {})["response_format"] = response_format(value)
    elif name in REQUEST_SETTINGS:
        raw.setdefault("request", {})[name] = value
    elif name in DATASET_SETTINGS:
        raw.setdefault("dataset", {})[name] = value
    elif name == "provider" and isinstance(value, str):
        raw.setdefault("provider", {})["kind"] = value
    elif name == "canary" and isinstance(value, bool):
        raw.pop("canary", None)
        if value:
            raw["canary"] = {}
    elif name in JOB_SETTINGS:
        raw[name] = value
    else:
        known = sorted(REQUEST_SETTINGS | DATASET_SETTINGS | JOB_SETTINGS | {"schema"})
        close = difflib.get_close_matches(name, known, n=1)
        raise TypeError(f"unknown setting {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" The settings are the job file's fields: {', '.join(known)}")


def response_format(schema: type[BaseModel] | dict[str, Any] | None) -> dict[str, Any]:
    """The job's `response_format` for a Pydantic model class (made strict as OpenAI's
    SDK makes it for structured outputs), a JSON-schema dict, or None (text)."""
    if schema is None:
        return {"type": "text"}
    if isinstance(schema, dict):
        return {"type": "json_schema", "schema": schema}
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        from openai.lib._pydantic import to_strict_json_schema

        return {"type": "json_schema", "name": schema.__name__[:64],
                "schema": to_strict_json_schema(schema)}
    raise TypeError(f"schema must be a Pydantic model class, a JSON-schema dict or None, "
                    f"not {type(schema).__name__}")


def _job_of(data: Data | Job | None, settings: dict[str, Any]) -> Job:
    if isinstance(data, Job):
        return make_job(job=data, **settings) if settings else data
    return make_job(data, **settings)


def _output_of(target: Job | str, storage_options: dict[str, Any] | None) -> Location:
    if isinstance(target, Job):
        return Location(target.output, target.storage_options)
    return Location(str(target), storage_options)


def _is_frame(data: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(data, pandas.DataFrame)


def _arrow(data: Any) -> pa.Table:
    """A DataFrame as Arrow; an index other than the row numbers becomes its columns."""
    if not _is_frame(data):
        raise TypeError(f"data must be a pandas DataFrame, a pyarrow Table, or a path or URI, "
                        f"not {type(data).__name__}")
    import pandas as pd

    return pa.Table.from_pandas(data, preserve_index=not isinstance(data.index, pd.RangeIndex))


def _store_table(table: pa.Table, root: Location, folder: str) -> str:
    """Write `table` as its run folder's input, once: the folder's name is the digest
    of its Parquet bytes, so the same rows find the same run again."""
    with tempfile.TemporaryDirectory() as scratch:
        local = f"{scratch}/{INPUT_FILE}"
        pq.write_table(table, local)
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            while chunk := handle.read(8 * 1024 * 1024):
                digest.update(chunk)
        name = digest.hexdigest()[:16]
        stored = f"{folder}/{RUNS}/{name}/{INPUT_FILE}"
        if not root.exists(stored):
            root.put_file(stored, local)
    return name


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _mtime(info: dict[str, Any]) -> float:
    modified = info.get("mtime") or info.get("LastModified") or 0
    return modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
