"""The `enrichflow` command: run jobs, inspect and cancel them, serve the local Batch API."""

from __future__ import annotations

import argparse
import logging
import sys


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


def build_parser() -> argparse.ArgumentParser:
    from localbatch import DEFAULT_PORT

    parser = argparse.ArgumentParser(prog="enrichflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the local OpenAI-compatible Batch API server")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--data-dir", default=".localbatch", help="where state and files live")
    serve.add_argument("--engine", choices=["mock", "forward"], default="mock")
    serve.add_argument("--config", help="simulation and faults YAML file")
    serve.add_argument("--api-key", help="require this bearer token (401 otherwise)")
    serve.add_argument("--upstream-url", help="forward engine: OpenAI-compatible base URL")
    serve.add_argument("--upstream-api-key", help="forward engine: the upstream's API key")
    serve.add_argument("--concurrency", type=int, default=8,
                       help="forward engine: requests in flight at once")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
