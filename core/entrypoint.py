"""What every long-running process does first: answer `--help` and `--version` (and exit: no daemon starts),
load its settings (an invalid variable is one line and exit 2), configure its JSON logs and its garbage collector."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from importlib.metadata import version

from core.adapters.metrics import serve_metrics
from core.logs import configure_logging
from core.settings import Settings, settings_or_exit

# Allocations (less deallocations) between two collections of the youngest generation; CPython's default is 700.
# Settling a batch allocates objects by the hundred thousand, nearly all freed by reference counting, so at 700
# the collector ran over and over for next to nothing: settling batches of 1,000 took 15 % less of a worker's
# CPU at this threshold, with start-up objects frozen (a run of 30 batches through `settle_group`, each way).
GC_YOUNGEST_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Collect cycles less often, and leave out of every collection what the process built to start (modules,
    settings, pools): it lives as long as the process."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, middle, oldest)


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
    tune_garbage_collector()
    return settings
