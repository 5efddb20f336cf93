"""The `enrichflow` command: run jobs, inspect and cancel them, serve the local Batch API."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from enrichflow.config import JobConfig

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network on our machines
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # first start can be slow
}


def _run(args: argparse.Namespace) -> int:
    import pandas as pd

    from flows.enrich import enrich, resolve_job
    from tasks.answers import EMBEDDING_COLUMN, answer_columns
    from tasks.estimate import usd
    from tasks.write import part_name

    job = resolve_job(args.config, args.output, args.limit, args.provider, args.base_url,
                      args.model, args.runner)
    _stop_on_interrupt(job)
    manifest = enrich(args.config, output=args.output, limit=args.limit,
                      provider=args.provider, base_url=args.base_url, model=args.model,
                      force=args.force, use_cache=not args.no_cache,
                      wait_for_lock=args.wait_for_lock, canary_only=args.canary_only,
                      runner=args.runner)
    print()
    if args.canary_only:
        canary = manifest["canary"]
        cost = "unknown" if canary["cost_usd"] is None else usd(canary["cost_usd"])
        print(f"canary:   {canary['rows'] - canary['failed']} of {canary['rows']} sample rows "
              f"answered usably ({canary['mode']}, {canary['seconds']} s, cost {cost}); "
              "their answers are kept for the full run")
        for error in canary["errors"]:
            print(f"  {error}")
        return 0
    print(f"output:   {manifest['output']}  (read it with pandas.read_parquet)")
    print("rows:     " + ", ".join(f"{n:,} {s}" for s, n in manifest["rows_by_status"].items()))
    print(f"batches:  {sum(1 for s in manifest['shards'] if s['batch_id'])}, "
          f"attempts: {manifest['attempts']}, rows reused from earlier runs: "
          f"{manifest['rows_reused']:,}")
    cost = manifest["cost_usd"]
    print(f"tokens:   {manifest['tokens']['prompt']:,} prompt, "
          f"{manifest['tokens']['completion']:,} completion; cost: "
          + ("unknown (no price for the model)" if cost is None else usd(cost)))
    if manifest.get("cancelled"):  # manifests written before cancels were recorded lack it
        print("cancelled: rows not answered are failed; run the job again to send them")
    first = pd.read_parquet(f"{manifest['output']}/{part_name(0)}",
                            storage_options=job.storage_options or None)
    shown = [job.dataset.id_column or first.columns[0],
             *answer_columns(job.request), "_status"]
    with pd.option_context("display.max_colwidth", 70, "display.width", 160):
        print(first[shown].head(5).to_string(index=False, formatters={
            EMBEDDING_COLUMN: lambda v: f"[{v[0]:.4f}, {v[1]:.4f}, … {len(v):,} numbers]"}))
    return 0


def _stop_on_interrupt(job: JobConfig) -> None:
    """Ctrl-C ends the run within seconds, with one line on what runs on and how to go
    on. Unwinding would not: Prefect's engine then reports the crash to its temporary
    server, which the same Ctrl-C stopped, and retries for minutes. Ending the process
    at once is safe: every journal write is whole or not at all, and the next run
    re-attaches, as after a kill. A second Ctrl-C ends it at once, without the line."""

    def interrupted(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        threading.Timer(4.0, os._exit, (130,)).start()  # if the storage does not answer
        try:  # not print(): in a flow, Prefect's log_prints makes it a log record
            _stop_temporary_prefect_server()
            os.write(sys.stderr.fileno(), f"\n{_what_runs_on(job)}\n".encode())
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


def _stop_temporary_prefect_server() -> None:
    """Ask Prefect's temporary server, a child process, to stop, as this process's exit
    would have: a Ctrl-C sent to this process alone (`kill -INT`) leaves it running."""
    server = sys.modules.get("prefect.server.api.server")
    for instance in list(server.SubprocessASGIServer._instances.values()) if server else []:
        if instance.server_process is not None:
            instance.server_process.terminate()


def _what_runs_on(job: JobConfig) -> str:
    """What an interrupted run leaves running at the provider, and how to go on."""
    from enrichflow.storage import Location
    from tasks.lease import drop_own_lease
    from tasks.state import RunState

    location = Location(job.output, job.storage_options)
    drop_own_lease(location)  # the next run, from any host, need not find it dead first
    state = RunState.load(location)
    if state is None or state.finished:
        return "interrupted: nothing was sent yet"
    resume = state.resume.get("command", "the same command")
    running = [record.batch_id for record in state.awaited()]
    if not running:
        return (f"interrupted: no batch of this run was running; `{resume}` goes on where "
                "it stopped")
    batches = f"{len(running)} batch(es) ({', '.join(running)})"
    if state.provider.get("local_data_dir"):
        return (f"interrupted: {batches} wait in the embedded local server, stopped with "
                f"this run; `{resume}` goes on with them")
    return (f"interrupted: {batches} run on at {state.provider.get('base_url') or 'OpenAI'} "
            f"and are billed as they finish; `{resume}` collects them without paying twice, "
            f"`enrichflow cancel {location.uri}` stops them")


def _estimate(args: argparse.Namespace) -> int:
    from flows.enrich import resolve_job
    from tasks.estimate import usd
    from tasks.prepare import prepare_job

    job = resolve_job(args.config, args.output, args.limit)
    print(prepare_job(job, use_cache=not args.no_cache).estimate.text())
    if job.max_cost_usd is not None:
        print(f"max_cost_usd:             {usd(job.max_cost_usd)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from enrichflow.storage import Location
    from tasks.state import RunState
    from tasks.write import read_manifest

    location = Location(args.output)
    manifest = read_manifest(location)
    state = RunState.load(location)
    if manifest is None and state is None:
        print(f"{args.output}: no enrichflow output or run state here", file=sys.stderr)
        return 1
    if manifest and (state is None or state.finished or state.run_id == manifest["run_id"]):
        print(f"complete: {manifest['job']} wrote {manifest['rows']:,} rows at "
              f"{manifest['finished_at']}")
        print("rows:     " + ", ".join(f"{n:,} {s}" for s, n in
                                       manifest["rows_by_status"].items()))
        print(f"tokens:   {manifest['tokens']['prompt']:,} prompt, "
              f"{manifest['tokens']['completion']:,} completion")
        return 0
    print(f"running or interrupted: run {state.run_id}"
          + (" (cancel requested)" if state.cancel_requested() else ""))
    if state.resume:
        where = "" if state.resume["cwd"] == os.getcwd() else f"cd {state.resume['cwd']} && "
        print(f"resume it: {where}{state.resume['command']}")
    if not state.shards:
        print("  no batch journaled yet: it was preparing, or checking its canary")
    for shard in state.shards:
        counts = shard.request_counts or {}
        done = counts.get("completed", 0) + counts.get("failed", 0)
        print(f"  {shard.name}: {shard.rows:,} rows, {shard.status}, batch "
              f"{shard.batch_id or '-'} {shard.batch_status or ''} "
              f"{done:,}/{counts.get('total', shard.rows):,} done")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from enrichflow.storage import Location
    from tasks.cancel import cancel_run

    state, cancelled = cancel_run(Location(args.output))
    if state is None:
        print(f"{args.output}: no unfinished run here; nothing to cancel", file=sys.stderr)
        return 1
    for batch in cancelled:
        print(f"cancelling {batch}")
    print(f"{len(cancelled)} batch(es) cancelled; finished answers stay billed and are kept. "
          "The run (also a suspended one) sends nothing more, collects what finished and "
          "writes its output; running the job again afterwards sends the rest.")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from localbatch import LocalBatchServer, Simulation

    simulation = Simulation.from_yaml(args.config) if args.config else Simulation()
    server = LocalBatchServer(
        args.data_dir, engine=args.engine, simulation=simulation, api_key=args.api_key,
        host=args.host, port=args.port, upstream_url=args.upstream_url,
        upstream_api_key=args.upstream_api_key, concurrency=args.concurrency)
    print(f"localbatch ({args.engine} engine) serving {server.base_url}, data in {args.data_dir}",
          flush=True)
    server.serve_forever()
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of rows, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from localbatch import DEFAULT_PORT

    parser = argparse.ArgumentParser(prog="enrichflow", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="show the full tracebacks of errors (default: one error line)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the local OpenAI-compatible Batch API server")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--data-dir", default=".localbatch", help="where state and files live")
    serve.add_argument("--engine", choices=["mock", "forward"], default="mock")
    serve.add_argument("--config", help="simulation and faults YAML file")
    serve.add_argument("--api-key", default=os.environ.get("LOCALBATCH_API_KEY"),
                       help="require this bearer token, 401 otherwise (default: "
                            "$LOCALBATCH_API_KEY, which the jobs also send)")
    serve.add_argument("--upstream-url", help="forward engine: OpenAI-compatible base URL")
    serve.add_argument("--upstream-api-key", default=os.environ.get("UPSTREAM_API_KEY"),
                       help="forward engine: the upstream's API key (default: "
                            "$UPSTREAM_API_KEY)")
    serve.add_argument("--concurrency", type=int, default=8,
                       help="forward engine: requests in flight at once")
    serve.set_defaults(handler=_serve)

    run = commands.add_parser("run", help="run a job file and write enriched Parquet")
    run.add_argument("config", help="job YAML file, e.g. configs/movies.yaml")
    run.add_argument("--output", help="output directory URI (overrides the job's output)")
    run.add_argument("--limit", type=_positive, help="only the first N rows")
    run.add_argument("--provider", choices=["local", "openai"],
                     help="default: openai when OPENAI_API_KEY is set, else local")
    run.add_argument("--base-url", help="API base URL (a running `enrichflow serve`, ...)")
    run.add_argument("--model", help="the model (overrides the job's request.model)")
    run.add_argument("--runner", choices=["threads", "dask"],
                     help="where the per-shard work runs (overrides the job's runner.kind)")
    run.add_argument("--force", action="store_true",
                     help="run again even if the output is complete")
    run.add_argument("--no-cache", action="store_true",
                     help="send every row, even those whose request was answered before")
    run.add_argument("--wait-for-lock", action="store_true",
                     help="if another run is writing the same output, wait for it to end")
    run.add_argument("--canary-only", action="store_true",
                     help="only answer and check a sample of rows (the job's canary, or "
                          "20 rows), then stop")
    run.set_defaults(handler=_run)

    estimate = commands.add_parser("estimate", help="rows, tokens and cost of a job, before")
    estimate.add_argument("config", help="job YAML file")
    estimate.add_argument("--output", help="output directory URI (where its cache is)")
    estimate.add_argument("--limit", type=_positive, help="only the first N rows")
    estimate.add_argument("--no-cache", action="store_true",
                          help="count every row, even those answered before")
    estimate.set_defaults(handler=_estimate)

    status = commands.add_parser("status", help="what a job's output and run state say")
    status.add_argument("output", help="the job's output directory URI")
    status.set_defaults(handler=_status)

    cancel = commands.add_parser("cancel", help="cancel a job's unfinished batches")
    cancel.add_argument("output", help="the job's output directory URI")
    cancel.set_defaults(handler=_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    import openai

    from enrichflow.errors import StorageError
    from tasks.api import describe_api_error

    # ConfigError, InputError and CostLimitError are ValueErrors; ProviderError, LeaseError,
    # CanaryFailedError and RowsFailedError are RuntimeErrors, and so is a local server's
    # data folder in use;
    # an openai.APIError is an API call (Files, Batches, or the canary's) that failed after
    # its retries
    expected = (ValueError, StorageError, RuntimeError, openai.APIError)
    if not args.verbose:
        _quiet_tracebacks(expected)
    try:
        return args.handler(args)
    except expected as exc:
        if args.verbose:
            raise
        message = describe_api_error(exc) if isinstance(exc, openai.APIError) else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


def _quiet_tracebacks(expected: tuple[type[BaseException], ...]) -> None:
    """Prefect logs an expected error with its traceback, for the task and again for the
    flow, before our one `error:` line: on the console, keep only its message. The
    Prefect API (the UI's logs) keeps everything, and so does --verbose."""
    import logging

    import prefect.main  # noqa: F401  (sets Prefect's logging up, console handler included)
    from prefect.logging.handlers import PrefectConsoleHandler

    class DropExpectedTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], expected):
                record.exc_info, record.exc_text = None, None
            return True

    for handler in logging.getLogger().handlers:  # Prefect puts its console handler on root
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(DropExpectedTraceback())
    # "Still processing items" at exit: Prefect's own events still going out to its API
    # after a run that failed at once, printed after the error line; not the job's
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
