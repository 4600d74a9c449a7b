"""`cleanledger` command line: migrate (and `--status`), verify, create-api-key, list-api-keys, revoke-api-key,
audit-lag, replay, supervisord-config.

A failure is one line on stderr and an exit status, never a traceback: 1 for what the command found (a
violation, a key that is not there), 2 for what was asked wrongly (argparse's too), 69 (EX_UNAVAILABLE) when
PostgreSQL cannot be reached."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import socket
import sys
from importlib.metadata import version
from pathlib import Path
from uuid import UUID

import psycopg

from core.adapters.postgres.api_keys import create_api_key, list_api_keys, revoke_api_key
from core.adapters.postgres.db import connect, open_pool
from core.adapters.postgres.migrate import MigrationError, migrate
from core.adapters.postgres.migrate import status as migration_status
from core.adapters.postgres.verify import verify
from core.adapters.rabbitmq.connection import queue_depth
from core.adapters.redis.revocations import announce_revoked
from core.application.ports import AuditUnavailable, Submission
from core.application.replay import recorded_operations, replay
from core.application.views import OperationResult
from core.bootstrap import audit_store, bootstrap
from core.domain.errors import LedgerError
from core.logs import configure_logging
from core.settings import Settings, settings_or_exit
from core.supervision import write_config

# Exit statuses (see the module's docstring).
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
# How long a command waits for PostgreSQL before it reports it unavailable, in seconds.
CONNECT_TIMEOUT_S = 5.0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    if args.status:
        for state in migration_status(settings):
            when = f" {state.applied_at.isoformat(timespec='seconds')}" if state.applied_at else ""
            print(f"{state.migration.version:04d}_{state.migration.name}: {state.status}{when}")
        return 0
    applied = migrate(settings)
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    if not applied:
        print("database is up to date")
    return 0


def cmd_verify(settings: Settings, _: argparse.Namespace) -> int:
    with connect(settings, autocommit=False, admin=True) as conn:
        violations = verify(conn)
    for violation in violations:
        print(f"VIOLATION {violation}")
    print("ledger verified: no violations" if not violations else f"{len(violations)} violation(s)")
    return 1 if violations else 0


def cli_actor() -> str:
    """Who runs this command, as the audit trail records an administrative action: `cli:<user>@<host>`."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment or the password database
        user = f"uid {os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def cmd_create_api_key(settings: Settings, args: argparse.Namespace) -> int:
    pool = open_pool(settings, min_size=1, max_size=1, open_timeout_s=CONNECT_TIMEOUT_S)
    try:
        key, secret = create_api_key(pool, args.tenant, name=args.name, actor=cli_actor())
    finally:
        pool.close()
    print(f"api key {key.id} for tenant {key.tenant_id} (shown once, store it now):", file=sys.stderr)
    print(secret)
    return 0


def cmd_list_api_keys(settings: Settings, args: argparse.Namespace) -> int:
    pool = open_pool(settings, min_size=1, max_size=1, open_timeout_s=CONNECT_TIMEOUT_S)
    try:
        keys = list_api_keys(pool, tenant_id=args.tenant, include_revoked=args.all)
    finally:
        pool.close()
    for key in keys:
        revoked = f"  revoked {key.revoked_at.isoformat(timespec='seconds')}" if key.revoked_at else ""
        created = key.created_at.isoformat(timespec="seconds")
        print(f"{key.id}  {key.tenant_id}  {key.prefix}...  {created}  {key.name!r}{revoked}")
    if not keys:
        print("no keys", file=sys.stderr)
    return 0


def key_id(value: str) -> UUID:
    """argparse type of an API key id."""
    try:
        return UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not an API key id (a UUID)") from None


def cmd_revoke_api_key(settings: Settings, args: argparse.Namespace) -> int:
    pool = open_pool(settings, min_size=1, max_size=1, open_timeout_s=CONNECT_TIMEOUT_S)
    try:
        revoked = revoke_api_key(pool, args.key_id, actor=cli_actor())
    finally:
        pool.close()
    if not revoked:
        print(f"cleanledger: no active API key {args.key_id}", file=sys.stderr)
        return EXIT_FOUND
    if announce_revoked(settings.redis_url, args.key_id):
        print("revoked; the ingress nodes were told")
    else:
        print(f"revoked; Redis is unavailable, so ingress nodes may accept it for up to {settings.api_key_cache_s:g} s")
    return 0


def cmd_audit_lag(settings: Settings, _: argparse.Namespace) -> int:
    """How far the audit trail trails the ledger: the newest event each holds, and what waits in between."""
    with connect(settings) as conn:
        row = conn.execute(
            "SELECT max(occurred_at), count(*) FILTER (WHERE published_at IS NULL) FROM outbox"
        ).fetchone()
    newest_event, unpublished = row if row else (None, 0)
    try:
        newest_record = audit_store(settings).newest()
    except AuditUnavailable as exc:
        print(f"audit store unreachable: {exc}")
        return 1
    waiting = queue_depth(settings.amqp_url, settings.audit_queue)
    print(f"newest ledger event:  {newest_event.isoformat() if newest_event else '-'}")
    print(f"newest audit record:  {newest_record.isoformat() if newest_record else '-'}")
    if newest_event and newest_record:
        print(f"behind by:            {max(0.0, (newest_event - newest_record).total_seconds()):.1f} s")
    queued = "-" if waiting is None else str(waiting)
    print(f"waiting: {unpublished} event(s) in the outbox, {queued} in {settings.audit_queue}")
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Re-run the audit trail's requests into an empty database; exit 1 unless every outcome and balance matches."""
    target = settings.replace(database_url=args.into)
    migrate(target)
    service = bootstrap(target, pool_size=2)
    try:
        with service.pool.connection() as conn:
            row = conn.execute("SELECT count(*) FROM accounts").fetchone()
        if row is not None and row[0]:
            print("the target database is not empty: replay needs a fresh one")
            return 2
        try:
            operations = recorded_operations(audit_store(settings).in_commit_order())
        except AuditUnavailable as exc:
            print(f"audit store unreachable: {exc}")
            return 1

        def give_up(submission: Submission, error: LedgerError) -> OperationResult:
            return service.give_up(
                submission.command,
                idempotency_key=submission.idempotency_key,
                operation_id=submission.operation_id,
                error=error,
            )

        def balance_of(tenant_id: str, account_id: UUID) -> int | None:
            account = service.queries.account(tenant_id, account_id)
            return None if account is None else account.balance

        report = replay(operations, settle_group=service.settle_group, give_up=give_up, balance_of=balance_of)
    finally:
        service.close()
    for mismatch in report.mismatches:
        print(f"MISMATCH {mismatch}")
    verdict = "every outcome and balance matches" if report.matches else f"{len(report.mismatches)} mismatch(es)"
    print(f"replayed {report.operations} operation(s), checked {report.accounts} balance(s): {verdict}")
    return 0 if report.matches else 1


def cmd_supervisord_config(_: Settings, args: argparse.Namespace) -> int:
    path = write_config(Path(args.procfile), root=Path(args.root), run_dir=Path(args.run_dir))
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanledger", description="Clean Ledger administration")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('cleanledger')}")
    parser.add_argument("--database-url", help="overrides CLEANLEDGER_DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate_cmd = sub.add_parser("migrate", help="apply pending SQL migrations (idempotent)")
    migrate_cmd.add_argument("--status", action="store_true", help="list each migration: applied, pending, changed")
    migrate_cmd.set_defaults(func=cmd_migrate)
    sub.add_parser("audit-lag", help="how far the MongoDB audit trail trails the ledger").set_defaults(
        func=cmd_audit_lag
    )
    replay_cmd = sub.add_parser("replay", help="re-run the audit trail into an empty database and compare")
    replay_cmd.add_argument("--into", required=True, help="URL of an empty PostgreSQL database to replay into")
    replay_cmd.set_defaults(func=cmd_replay)
    sub.add_parser("verify", help="check the ledger's invariants; exit 1 on any violation").set_defaults(
        func=cmd_verify
    )
    create = sub.add_parser("create-api-key", help="create an API key for a tenant; prints the secret once")
    create.add_argument("--tenant", required=True, help="tenant id: 1-63 of a-z 0-9 _ -")
    create.add_argument("--name", default="", help="a label for the key")
    create.set_defaults(func=cmd_create_api_key)
    listing = sub.add_parser("list-api-keys", help="list API keys (never their secrets)")
    listing.add_argument("--tenant", help="only this tenant's")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    listing.set_defaults(func=cmd_list_api_keys)
    revoke = sub.add_parser("revoke-api-key", help="revoke an API key by id")
    revoke.add_argument("key_id", type=key_id)
    revoke.set_defaults(func=cmd_revoke_api_key)
    conf = sub.add_parser(
        "supervisord-config", help="write <run-dir>/supervisord.conf from the Procfile (every process supervised)"
    )
    conf.add_argument("--procfile", default="Procfile", help="default: ./Procfile")
    conf.add_argument("--root", default=".", help="directory the processes run in (default: .)")
    conf.add_argument("--run-dir", default="var", help="control socket, pid file and log/ (default: ./var)")
    conf.set_defaults(func=cmd_supervisord_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = settings_or_exit("cleanledger", **overrides)
    configure_logging(level=settings.log_level, json=settings.log_json)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # its retries would bury the one-line answer
    try:
        if args.func not in (cmd_supervisord_config, cmd_migrate):  # migrate may have to create the database
            # Ask PostgreSQL once, directly: its own refusal is the clearest line to print.
            with connect(settings, admin=True, connect_timeout_s=CONNECT_TIMEOUT_S):
                pass
        result: int = args.func(settings, args)
    except psycopg.OperationalError as exc:
        print(f"cleanledger: PostgreSQL is unavailable: {first_line(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (MigrationError, LedgerError) as exc:
        print(f"cleanledger: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, LedgerError) else EXIT_FOUND
    return result


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


if __name__ == "__main__":
    sys.exit(main())
