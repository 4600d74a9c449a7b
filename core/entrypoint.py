"""What every long-running process does first: answer `--help` and `--version` (and exit: no daemon starts),
load its settings (an invalid variable is one line and exit 2), configure its JSON logs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.metadata import version

from core.adapters.metrics import serve_metrics
from core.logs import configure_logging
from core.settings import Settings, settings_or_exit


def parser_for(program: str, description: str) -> argparse.ArgumentParser:
    """The process's command line: `--help`, `--version`; the caller may add its own options."""
    parser = argparse.ArgumentParser(
        prog=program,
        description=description,
        epilog="Configured by CLEANLEDGER_* environment variables (see README.md, Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"cleanledger {version('cleanledger')}")
    return parser


def add_metrics_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (default: not served)",
    )


def serve_metrics_if_asked(args: argparse.Namespace) -> None:
    if args.metrics_port:
        serve_metrics(args.metrics_port)


def start(program: str, description: str, argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line (--help, --version, --metrics-port), then settings and logs; serve the metrics."""
    parser = parser_for(program, description)
    add_metrics_option(parser)
    args = parser.parse_args(argv)
    settings = settings_or_exit(program)
    configure_logging(level=settings.log_level, json=settings.log_json)
    serve_metrics_if_asked(args)
    return settings
