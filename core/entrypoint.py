"""What every long-running process does first: answer `--help` and `--version` (and exit: no daemon starts),
load its settings (an invalid variable is one line and exit 2), configure its JSON logs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib.metadata import version

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


def start(program: str, description: str, argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line (which takes no options beyond --help and --version), then settings and logs."""
    parser_for(program, description).parse_args(argv)
    settings = settings_or_exit(program)
    configure_logging(level=settings.log_level, json=settings.log_json)
    return settings
