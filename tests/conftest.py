from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from core.adapters.postgres.migrate import migrate
from core.bootstrap import LedgerService, bootstrap
from core.logs import configure_logging
from core.settings import Settings
from tests.services import postgres_admin_url


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """Settings pointing at a fresh database of its own, migrated, dropped after the run."""
    configure_logging(level="WARNING", json=True)
    with postgres_admin_url() as admin_url:
        name = f"cleanledger_test_{uuid.uuid4().hex[:12]}"
        database_url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
        test_settings = Settings.from_env(database_url=database_url)
        migrate(test_settings)
        try:
            yield test_settings
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def ledger(settings: Settings) -> Iterator[LedgerService]:
    service = bootstrap(settings, pool_size=24)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def tenant() -> str:
    """A tenant of its own per test, so tests share the database without seeing each other's data."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        yield conn
