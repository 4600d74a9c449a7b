"""Versioned SQL migrations: files `NNNN_name.sql` beside this module, applied in order, each in its own
transaction, recorded with a checksum in `schema_migrations`. Running it again is a no-op; an applied
migration whose file changed is refused rather than silently diverging."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import psycopg

from core.adapters.postgres.db import connect
from core.settings import Settings

# Arbitrary but fixed: concurrent `migrate` runs queue on this advisory lock instead of racing.
MIGRATION_LOCK_KEY = 0x436C65616E4C6467  # "CleanLdg"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


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


def migrate(settings: Settings) -> list[Migration]:
    """Apply pending migrations; returns those applied now."""
    ensure_database(settings)
    applied_now: list[Migration] = []
    with connect(settings, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done: dict[int, str] = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            for migration in available():
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version}_{migration.name} changed after it was applied"
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now
