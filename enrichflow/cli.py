"""The `enrichflow` command: run jobs, inspect and cancel them, serve the local Batch API
and receive OpenAI's batch webhooks."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import closing, nullcontext
from typing import TYPE_CHECKING, get_args

from enrichflow.local_prefect import set_defaults, start_own_server

if TYPE_CHECKING:
    import pandas as pd

    from enrichflow.config import Job

# exit codes: 0 done, 1 nothing there (status, cancel, preview), 2 an error (one line),
# 3 the run was cancelled (its output written, its unanswered rows failed), 130 interrupted
EXIT_CANCELLED = 3
DEADLINE_HELP = ("when the rows are needed, with its time zone (2026-12-04T07:00:00Z): those "
                 "not answered limits.deadline_lead_seconds before it go through the "
                 "synchronous API (overrides the job's deadline)")


def _run(args: argparse.Namespace) -> int:
    from enrichflow.config import resolve_job
    from enrichflow.storage import Location
    from enrichflow.tasks.preflight import preflight
    from enrichflow.tasks.status import already_complete, already_complete_line

    job = resolve_job(args.config, args.output, args.limit, args.provider, args.base_url,
                      args.model, args.runner, deadline=args.deadline)
    # before Prefect is imported and started: a complete job, or its errors, in seconds
    manifest = None if args.force or args.canary_only else already_complete(job)
    if manifest:
        print(already_complete_line(job, Location(job.output, job.storage_options)))
    else:
        start_own_server()  # it starts while the pre-flight runs
        preflight(job)

    import pandas as pd

    from enrichflow.provider import answered_by, cost_text
    from enrichflow.tasks.answers import EMBEDDING_COLUMN, answer_columns
    from enrichflow.tasks.estimate import deadline_text, estimate_error_text, usd
    from enrichflow.tasks.write import part_name

    if not manifest:
        import prefect.main  # noqa: F401  (sets Prefect's logging up, its console included)

        from enrichflow.flows.enrich import enrich
        from enrichflow.local_prefect import on_a_prefect_server
        from enrichflow.progress import ProgressBar, logs_above_the_bar
        from enrichflow.tasks.watch import watching

        if not args.verbose:
            _quiet_tracebacks()
        _stop_on_interrupt(job)
        bar = ProgressBar(job.name)
        with on_a_prefect_server(), (watching(bar) if sys.stderr.isatty() else nullcontext()), \
                closing(bar), logs_above_the_bar():
            manifest = enrich(args.config, output=args.output, limit=args.limit,
                              provider=args.provider, base_url=args.base_url,
                              model=args.model, deadline=args.deadline, force=args.force,
                              use_cache=not args.no_cache,
                              wait_for_lock=args.wait_for_lock,
                              canary_only=args.canary_only, runner=args.runner)
            bar.finished()
    print()
    if args.canary_only:
        canary = manifest["canary"]
        cost = "unknown" if canary["cost_usd"] is None else usd(canary["cost_usd"])
        print(f"canary:   {canary['rows'] - canary['failed']} of {canary['rows']} sample rows "
              f"answered usably ({canary['mode']}, {canary['seconds']} s, cost {cost}); "
              "their answers are kept for the full run")
        for error in canary["errors"]:
            print(f"  {error}")
        answers = _canary_answers(job)
        if answers is not None:
            with pd.option_context("display.max_colwidth", 60, "display.width", 160):
                print(answers.to_string(index=False, na_rep=""))
            from enrichflow.tasks.state import CANARY_RESULTS

            print(f"(kept in {job.output}/{CANARY_RESULTS}, read it with "
                  "pandas.read_parquet)")
        print("`enrichflow estimate` now gives the job's likely cost from these answers")
        return 0
    print(f"output:   {manifest['output']}  (read it with pandas.read_parquet)")
    print("rows:     " + ", ".join(f"{n:,} {s}" for s, n in manifest["rows_by_status"].items()))
    print(f"batches:  {sum(1 for s in manifest['shards'] if s['batch_id'])}, "
          f"attempts: {manifest['attempts']}, rows reused from earlier runs: "
          f"{manifest['rows_reused']:,}")
    print(f"tokens:   {manifest['tokens']['prompt']:,} prompt, "
          f"{manifest['tokens']['completion']:,} completion; cost: "
          f"{cost_text(manifest['cost_usd'], manifest['provider'])}")
    if manifest.get("estimate_error"):  # manifests from before it was recorded
        print(f"estimate: {estimate_error_text(manifest['estimate_error'])}")
    if manifest.get("deadline"):
        print(f"deadline: {deadline_text(manifest['deadline'])}")
    print(f"answered by: {answered_by(manifest['provider'])}")
    cancelled = manifest.get("cancelled")  # manifests from before cancels were recorded
    if cancelled:
        print("cancelled: rows not answered are failed; run the job again to send them")
    first = pd.read_parquet(f"{manifest['output']}/{part_name(0)}",
                            storage_options=job.storage_options or None)
    shown = [job.dataset.id_column or first.columns[0],
             *answer_columns(job.request), "_status"]
    with pd.option_context("display.max_colwidth", 70, "display.width", 160):
        print(first[shown].head(5).to_string(index=False, formatters={
            EMBEDDING_COLUMN: lambda v: f"[{v[0]:.4f}, {v[1]:.4f}, … {len(v):,} numbers]"}))
    return EXIT_CANCELLED if cancelled else 0


def _canary_answers(job: Job) -> pd.DataFrame | None:
    """The canary's sample as the run journaled it: each row's id, answer and error."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pa_types

    from enrichflow.storage import Location
    from enrichflow.tasks.state import RunState

    state = RunState.load(Location(job.output, job.storage_options))
    results = state.canary_results() if state else None
    if results is None:
        return None
    table = {"row": pc.list_element(pc.split_pattern(  # a custom_id is `<tag>-<row id>`
        results["_custom_id"], "-", max_splits=1), 1)}
    value = results.schema.field("_value").type if "_value" in results.column_names else None
    if value is not None and pa_types.is_struct(value):
        table |= {field.name: results["_value"].combine_chunks().field(field.name)
                  for field in value}
    else:
        table["answer"] = results["_answer"]
    table["_error"] = results["_error"]
    return pa.table(table).to_pandas()


def _stop_on_interrupt(job: Job) -> None:
    """Ctrl-C ends the run within seconds, with one line on what runs on and how to go
    on, not Prefect's crash report and its tracebacks. Ending the process at once is
    safe: every journal write is whole or not at all, and the next run re-attaches, as
    after a kill; the Prefect server of this process ends with it. A second Ctrl-C ends
    it at once, without the line."""
    from enrichflow.storage import Location
    from enrichflow.tasks.status import what_runs_on

    def interrupted(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        threading.Timer(4.0, os._exit, (130,)).start()  # if the storage does not answer
        try:  # not print(): in a flow, Prefect's log_prints makes it a log record
            line = what_runs_on(Location(job.output, job.storage_options), job)
            os.write(sys.stderr.fileno(), f"\n{line}\n".encode())
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


def _estimate(args: argparse.Namespace) -> int:
    from enrichflow.config import resolve_job
    from enrichflow.tasks.estimate import usd
    from enrichflow.tasks.prepare import prepare_job

    job = resolve_job(args.config, args.output, args.limit, model=args.model,
                      deadline=args.deadline)
    print(prepare_job(job, use_cache=not args.no_cache).estimate_left().text())
    if job.max_cost_usd is not None:
        print(f"max_cost_usd:             {usd(job.max_cost_usd)}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from enrichflow.config import resolve_job
    from enrichflow.tasks.preflight import preview_lines

    job = resolve_job(args.config, model=args.model)
    lines = preview_lines(job, args.rows)
    if not lines:
        print(f"{job.dataset.path}: its first {args.rows} row(s) send no request "
              "(empty, or skipped for an empty column)", file=sys.stderr)
        return 1
    sys.stdout.write("".join(lines))
    return 0


def _status(args: argparse.Namespace) -> int:
    from enrichflow.storage import Location
    from enrichflow.tasks.status import run_status

    if args.output is None:
        return _committed()
    status = run_status(Location(args.output))
    if status is None:
        print(f"{args.output}: no enrichflow output or run state here", file=sys.stderr)
        return 1
    print(status.text())
    return 0


def _committed() -> int:
    """`enrichflow status` alone: what the organisation's runs hold in the providers'
    queues, from the ledgers of the Prefect server PREFECT_API_URL names."""
    from enrichflow.local_prefect import on_a_shared_server

    if not on_a_shared_server():
        print("error: no Prefect server is named by PREFECT_API_URL, so no ledger of what "
              "runs hold in the providers' queues; give an output (`enrichflow status "
              "OUTPUT`) or set PREFECT_API_URL", file=sys.stderr)
        return 2
    from enrichflow.tasks.ledger import committed_lines

    lines = committed_lines()
    print("\n".join(lines) if lines else "no run holds enqueued tokens on this Prefect server")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from enrichflow.storage import Location
    from enrichflow.tasks.cancel import cancel_run

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


def _webhooks(args: argparse.Namespace) -> int:
    from enrichflow.webhooks import SECRET_ENV, serve

    serve(args.host, args.port, os.environ.get(SECRET_ENV))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of rows, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from enrichflow.config import ProviderKind
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
    run.add_argument("--provider", choices=get_args(ProviderKind),
                     help="default: openai when OPENAI_API_KEY is set, else local")
    run.add_argument("--base-url", help="API base URL (a running `enrichflow serve`, ...)")
    run.add_argument("--model", help="the model (overrides the job's request.model)")
    run.add_argument("--deadline", help=DEADLINE_HELP)
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
    estimate.add_argument("--model", help="price it for this model (overrides the job's "
                                          "request.model)")
    estimate.add_argument("--deadline", help=DEADLINE_HELP)
    estimate.set_defaults(handler=_estimate)

    preview = commands.add_parser("preview", help="the first requests, as they would be "
                                                  "uploaded; nothing is sent")
    preview.add_argument("config", help="job YAML file")
    preview.add_argument("-n", "--rows", type=_positive, default=3,
                         help="how many rows (default: 3)")
    preview.add_argument("--model", help="the model (overrides the job's request.model)")
    preview.set_defaults(handler=_preview)

    status = commands.add_parser("status", help="what a job's output and run state say; "
                                                "alone, what all runs hold in the queues")
    status.add_argument("output", nargs="?", help="the job's output directory URI; without "
                        "it, the enqueued tokens that runs hold, per provider and model")
    status.set_defaults(handler=_status)

    cancel = commands.add_parser("cancel", help="cancel a job's unfinished batches")
    cancel.add_argument("output", help="the job's output directory URI")
    cancel.set_defaults(handler=_cancel)

    webhooks = commands.add_parser(
        "webhooks", help="resume suspended runs when OpenAI's batch webhooks say a batch "
                         "ended (signing secret in OPENAI_WEBHOOK_SECRET)")
    webhooks.add_argument("--host", default="127.0.0.1",
                          help="bind address (default: loopback; 0.0.0.0 behind a proxy)")
    webhooks.add_argument("--port", type=int, default=8700)
    webhooks.set_defaults(handler=_webhooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_defaults()
    args = build_parser().parse_args(argv)
    from enrichflow.tasks.api import describe_api_error, sdk_errors

    try:
        return args.handler(args)
    except KeyboardInterrupt:  # a run's own line is `_stop_on_interrupt`'s, once it sends
        print("\ninterrupted" + (": nothing was sent" if args.handler is _run else ""),
              file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or not isinstance(exc, _expected_errors()):
            raise
        message = describe_api_error(exc) if isinstance(exc, sdk_errors()) else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The errors said in one `error:` line. ConfigError, InputError and CostLimitError
    are ValueErrors; ProviderError, LeaseError, CanaryFailedError and RowsFailedError are
    RuntimeErrors, and so is a local server's data folder in use; an SDK's APIError is
    an API call (Files, Batches, or the canary's) that failed after its retries."""
    from enrichflow.errors import StorageError
    from enrichflow.tasks.api import sdk_errors

    return ValueError, StorageError, RuntimeError, *sdk_errors()


def _quiet_tracebacks() -> None:
    """An expected error is said once, by our `error:` line: on the console, Prefect's
    records of it (the task's and the flow's exception, with tracebacks, and the runs'
    "Finished in state Failed(...)" that repeat its text) are left out. The Prefect API
    (the UI's logs) keeps everything, and so does --verbose."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    class DropExpected(logging.Filter):
        def __init__(self) -> None:
            super().__init__()
            self.said: set[str] = set()  # the expected errors met so far

        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], _expected_errors()):
                self.said.add(str(record.exc_info[1]))
                return False
            return not any(text in record.getMessage() for text in self.said)

    for handler in logging.getLogger().handlers:  # Prefect puts its console handler on root
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(DropExpected())
    # "Still processing items" at exit: Prefect's own events still going out to its API
    # after a run that failed at once, printed after the error line; not the job's
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
