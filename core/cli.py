"""`cleanledger` command line: migrate, verify, create-api-key, revoke-api-key, audit-lag, replay,
supervisord-config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from uuid import UUID

from core.adapters.postgres.api_keys import create_api_key, revoke_api_key
from core.adapters.postgres.db import connect, open_pool
from core.adapters.postgres.migrate import migrate
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


def cmd_create_api_key(settings: Settings, args: argparse.Namespace) -> int:
    pool = open_pool(settings, min_size=1, max_size=1)
    try:
        key, secret = create_api_key(pool, args.tenant, name=args.name)
    finally:
        pool.close()
    print(f"api key {key.id} for tenant {key.tenant_id} (shown once, store it now):", file=sys.stderr)
    print(secret)
    return 0


def cmd_revoke_api_key(settings: Settings, args: argparse.Namespace) -> int:
    pool = open_pool(settings, min_size=1, max_size=1)
    try:
        revoked = revoke_api_key(pool, UUID(args.key_id))
    finally:
        pool.close()
    if not revoked:
        print("no such active key")
        return 1
    if announce_revoked(settings.redis_url, UUID(args.key_id)):
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
    parser.add_argument("--database-url", help="overrides CLEANLEDGER_DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending SQL migrations (idempotent)").set_defaults(func=cmd_migrate)
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
    revoke = sub.add_parser("revoke-api-key", help="revoke an API key by id")
    revoke.add_argument("key_id")
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
    result: int = args.func(settings, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
