"""Versioned SQL migrations: files `NNNN_name.sql` beside this module, applied in order, each in its own
transaction, recorded with a checksum in `schema_migrations`. Running it again is a no-op; an applied
migration whose file changed is refused rather than silently diverging.

A migration whose first line is `-- cleanledger: no transaction` runs outside a transaction instead, one
statement at a time (statements end with `;` at the end of a line): what PostgreSQL refuses inside one, such
as `CREATE INDEX CONCURRENTLY` on a live ledger. It is recorded once all its statements succeeded, so each
must be safe to run again (`IF NOT EXISTS`) should one of them fail.

Migrations run on an administration connection: no statement timeout (an index on a real-sized ledger takes
longer than a request's 5 s)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg

from core.adapters.postgres.db import connect
from core.settings import Settings

# Arbitrary but fixed: concurrent `migrate` runs queue on this advisory lock instead of racing.
MIGRATION_LOCK_KEY = 0x436C65616E4C6467  # "CleanLdg"


NO_TRANSACTION = "-- cleanledger: no transaction"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The statements of a no-transaction migration, one by one."""
        found, current = [], []
        for line in self.sql.splitlines():
            current.append(line)
            if line.rstrip().endswith(";"):
                statement = "\n".join(current).strip()
                if any(not part.strip().startswith("--") for part in statement.splitlines() if part.strip()):
                    found.append(statement)
                current = []
        return found


@dataclass(frozen=True, slots=True)
class MigrationState:
    migration: Migration
    status: str  # "applied", "pending" or "changed" (applied, but its file differs now)
    applied_at: datetime | None


class MigrationError(RuntimeError):
    pass


def available() -> list[Migration]:
    folder = resources.files("core.adapters.postgres") / "migrations"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            version, _, rest = item.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), item.read_text()))
    return sorted(found, key=lambda m: m.version)


def ensure_database(settings: Settings) -> None:
    """Create the target database if it does not exist (connecting to the server's `postgres` db)."""
    info = psycopg.conninfo.conninfo_to_dict(settings.database_url)
    name = str(info.get("dbname", ""))
    admin = psycopg.conninfo.make_conninfo(settings.database_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def status(settings: Settings, migrations: list[Migration] | None = None) -> list[MigrationState]:
    """Every migration and whether it is applied, pending, or changed since it was applied."""
    with connect(settings, autocommit=True, admin=True) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        rows = (
            conn.execute("SELECT version, checksum, applied_at FROM schema_migrations").fetchall()
            if exists and exists[0]
            else []
        )
    done = {version: (checksum, applied_at) for version, checksum, applied_at in rows}
    states = []
    for migration in available() if migrations is None else migrations:
        checksum, applied_at = done.get(migration.version, (None, None))
        state = "pending" if checksum is None else "applied" if checksum == migration.checksum else "changed"
        states.append(MigrationState(migration, state, applied_at))
    return states


def migrate(settings: Settings, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply pending migrations (by default the package's); returns those applied now."""
    ensure_database(settings)
    applied_now: list[Migration] = []
    with connect(settings, autocommit=True, admin=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done: dict[int, str] = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            for migration in available() if migrations is None else migrations:
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version}_{migration.name} changed after it was applied"
                        )
                    continue
                record = (
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                if migration.transactional:
                    with conn.transaction():
                        conn.execute(migration.sql.encode())
                        conn.execute(*record)
                else:
                    for statement in migration.statements():
                        conn.execute(statement.encode())  # autocommit: each on its own, outside any transaction
                    conn.execute(*record)
                applied_now.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now
