"""`cleanledger` command line: migrate, verify."""

from __future__ import annotations

import argparse
import sys

from core.adapters.postgres.db import connect
from core.adapters.postgres.migrate import migrate
from core.adapters.postgres.verify import verify
from core.logs import configure_logging
from core.settings import Settings


def cmd_migrate(settings: Settings, _: argparse.Namespace) -> int:
    applied = migrate(settings)
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    if not applied:
        print("database is up to date")
    return 0


def cmd_verify(settings: Settings, _: argparse.Namespace) -> int:
    with connect(settings, autocommit=False) as conn:
        violations = verify(conn)
    for violation in violations:
        print(f"VIOLATION {violation}")
    print("ledger verified: no violations" if not violations else f"{len(violations)} violation(s)")
    return 1 if violations else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanledger", description="Clean Ledger administration")
    parser.add_argument("--database-url", help="overrides CLEANLEDGER_DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending SQL migrations (idempotent)").set_defaults(func=cmd_migrate)
    sub.add_parser("verify", help="check the ledger's invariants; exit 1 on any violation").set_defaults(
        func=cmd_verify
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = Settings.from_env(**overrides)
    configure_logging(level=settings.log_level, json=settings.log_json)
    result: int = args.func(settings, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
