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
from tests.processes import ManagedProcess, settings_env, worker_command
from tests.services import delete_exchange, delete_queues, postgres_admin_url


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """Settings pointing at a fresh database of its own, migrated, dropped after the run."""
    configure_logging(level="WARNING", json=True)
    with postgres_admin_url() as admin_url:
        name = f"cleanledger_test_{uuid.uuid4().hex[:12]}"
        database_url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
        test_settings = Settings.from_env(
            database_url=database_url,
            command_queue=f"ledger.commands.{name}",  # private queue: no stray worker can take our commands
            request_exchange=f"ledger.requests.{name}",  # and a private exchange for direct AMQP producers
            request_queue=f"ledger.requests.{name}",
            audit_queue=f"ledger.audit.{name}",  # the relay declares it: private, and deleted afterwards
            webhook_queue=f"ledger.webhooks.{name}",  # private fan-out queue of the run's webhook workers
            # Private events too: a queue someone bound to the shared exchange (a local `ops/run`'s audit queue)
            # would otherwise keep every event the tests publish, forever.
            events_exchange=f"ledger.events.{name}",
            log_level="WARNING",
        )
        migrate(test_settings)
        try:
            yield test_settings
        finally:
            delete_queues(test_settings)
            delete_exchange(test_settings, test_settings.events_exchange)  # the run's own, see above
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


@pytest.fixture(scope="session")
def service_env(settings: Settings) -> dict[str, str]:
    """Environment for the system's processes (ingress, workers...) started by tests."""
    return settings_env(settings)


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str]) -> Iterator[ManagedProcess]:
    """One real Dramatiq worker process consuming the test run's command queue."""
    with ManagedProcess.start(worker_command(), env=service_env, name="worker") as process:
        yield process


@pytest.fixture
def poison(db: psycopg.Connection[tuple[object, ...]]) -> Iterator[dict[str, object]]:
    """Metadata that makes PostgreSQL refuse the posting (a trigger raises): a command valid to the domain
    that fails for a reason no retry fixes, standing for any bug or constraint one command may trip."""
    db.execute(
        "CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.metadata ? 'poison' THEN RAISE EXCEPTION 'poisoned posting'; END IF; RETURN NEW; END $$"
    )
    db.execute("CREATE TRIGGER test_poison BEFORE INSERT ON transactions FOR EACH ROW EXECUTE FUNCTION test_poison()")
    try:
        yield {"poison": "yes"}
    finally:
        db.execute("DROP TRIGGER test_poison ON transactions")
        db.execute("DROP FUNCTION test_poison()")
