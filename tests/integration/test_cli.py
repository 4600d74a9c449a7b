"""The `cleanledger` command and the processes' command lines: one-line errors with exit statuses, never a
traceback; `--help` and `--version` that start nothing; API keys listed without secrets; migrations' status and
migrations outside a transaction, on the real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from core.adapters.postgres.api_keys import create_api_key, revoke_api_key
from core.adapters.postgres.migrate import Migration, available, ensure_database, migrate, status
from core.bootstrap import LedgerService
from core.settings import Settings
from tests.processes import settings_env

ROOT = Path(__file__).resolve().parents[2]
CLOSED_PORT_POSTGRES = "postgresql://postgres@127.0.0.1:1/nowhere"


def cleanledger(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cleanledger"), *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_version(settings: Settings) -> None:
    done = cleanledger(settings, "--version")
    assert done.returncode == 0 and done.stdout.startswith("cleanledger 0.")


@pytest.mark.parametrize("module", ["workers.redeliver", "workers.consumer", "workers.audit", "workers.relay"])
def test_help_starts_no_daemon(settings: Settings, module: str) -> None:
    # Pointed at a closed port: a daemon that started anyway would hang or fail, not exit 0 at once.
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        env=settings_env(settings.replace(database_url=CLOSED_PORT_POSTGRES)),
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "CLEANLEDGER_" in done.stdout


def test_a_bad_argument_is_one_line_and_exit_2(settings: Settings) -> None:
    done = cleanledger(settings, "revoke-api-key", "x")
    assert done.returncode == 2
    assert "is not an API key id" in done.stderr and "Traceback" not in done.stderr


def test_the_database_down_is_one_line_and_exit_69(settings: Settings) -> None:
    for command in (["verify"], ["list-api-keys"], ["migrate", "--status"]):
        done = cleanledger(settings.replace(database_url=CLOSED_PORT_POSTGRES), *command, timeout=30)
        assert done.returncode == 69, (command, done.stderr)
        assert done.stderr.startswith("cleanledger: PostgreSQL is unavailable:"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_list_api_keys_never_shows_a_secret(settings: Settings, ledger: LedgerService, tenant: str) -> None:
    live, live_secret = create_api_key(ledger.pool, tenant, name="payments")
    gone, gone_secret = create_api_key(ledger.pool, tenant, name="old")
    assert revoke_api_key(ledger.pool, gone.id)
    listed = cleanledger(settings, "list-api-keys", "--tenant", tenant)
    assert listed.returncode == 0, listed.stderr
    assert str(live.id) in listed.stdout and "'payments'" in listed.stdout
    assert str(gone.id) not in listed.stdout  # revoked: only with --all
    everything = cleanledger(settings, "list-api-keys", "--tenant", tenant, "--all")
    assert str(gone.id) in everything.stdout and "revoked" in everything.stdout
    for secret in (live_secret, gone_secret):
        assert secret not in everything.stdout + everything.stderr
        assert secret[:12] in everything.stdout  # the visible prefix tells keys apart
    assert cleanledger(settings, "revoke-api-key", str(uuid.uuid4())).returncode == 1  # no such key


def test_migrate_status_lists_every_migration_as_applied(settings: Settings) -> None:
    done = cleanledger(settings, "migrate", "--status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(available())
    assert all(": applied " in line for line in lines), lines


@pytest.fixture
def empty_database(settings: Settings) -> Iterator[Settings]:
    name = f"{psycopg.conninfo.conninfo_to_dict(settings.database_url)['dbname']}_mig_{uuid.uuid4().hex[:6]}"
    target = settings.replace(database_url=psycopg.conninfo.make_conninfo(settings.database_url, dbname=name))
    try:
        yield target
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_migration_can_run_outside_a_transaction(empty_database: Settings) -> None:
    plain = Migration(1, "table", "CREATE TABLE t (id int PRIMARY KEY, v text);\nINSERT INTO t VALUES (1, 'a');\n")
    concurrent = Migration(
        2,
        "index",
        "-- cleanledger: no transaction\n"
        "-- PostgreSQL refuses CREATE INDEX CONCURRENTLY inside a transaction block.\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_v_idx ON t (v);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_v_id_idx\n  ON t (v, id);\n",
    )
    ensure_database(empty_database)
    assert [s.status for s in status(empty_database, [plain, concurrent])] == ["pending", "pending"]
    assert migrate(empty_database, [plain, concurrent]) == [plain, concurrent]
    with psycopg.connect(empty_database.database_url) as conn:
        indexes = {row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 't'")}
    assert {"t_v_idx", "t_v_id_idx"} <= indexes
    assert [s.status for s in status(empty_database, [plain, concurrent])] == ["applied", "applied"]
    assert migrate(empty_database, [plain, concurrent]) == []  # idempotent
    edited = Migration(2, "index", concurrent.sql + "-- edited\n")
    assert [s.status for s in status(empty_database, [plain, edited])] == ["applied", "changed"]
