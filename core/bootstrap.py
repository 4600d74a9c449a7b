"""Composition root: wires the PostgreSQL adapters to the use cases. Both entry points (ingress, workers)
and the tests build the ledger through `bootstrap()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from psycopg_pool import ConnectionPool

from core.adapters.postgres.db import open_pool
from core.adapters.postgres.queries import PostgresQueries
from core.adapters.postgres.uow import PostgresUnitOfWork
from core.application import handlers
from core.application.commands import Command
from core.application.retry import RetryPolicy
from core.application.views import OperationResult
from core.domain.errors import LedgerError
from core.settings import Settings


@dataclass
class LedgerService:
    """The ledger's use cases bound to their adapters."""

    settings: Settings
    pool: ConnectionPool
    queries: PostgresQueries
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def unit_of_work(self) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(self.pool)

    def execute(self, command: Command, *, idempotency_key: str, operation_id: UUID | None = None) -> OperationResult:
        """Run a command exactly once for its (tenant, key), retrying serialization conflicts."""
        return handlers.run(
            command,
            uow_factory=self.unit_of_work,
            idempotency_key=idempotency_key,
            operation_id=operation_id,
            retry=self.retry,
        )

    def accept(self, command: Command, *, idempotency_key: str, operation_id: UUID) -> OperationResult:
        """Record a command as a pending operation (ingress phase); the key's operation if already known."""
        return self.retry.run(
            lambda: handlers.accept(
                command, uow=self.unit_of_work(), idempotency_key=idempotency_key, operation_id=operation_id
            ),
            what="accept",
        )

    def abandon(self, tenant_id: str, *, idempotency_key: str, operation_id: UUID) -> None:
        self.retry.run(
            lambda: handlers.abandon(
                tenant_id, uow=self.unit_of_work(), idempotency_key=idempotency_key, operation_id=operation_id
            ),
            what="abandon",
        )

    def give_up(
        self, command: Command, *, idempotency_key: str, operation_id: UUID, error: LedgerError
    ) -> OperationResult:
        return self.retry.run(
            lambda: handlers.give_up(
                command,
                uow=self.unit_of_work(),
                idempotency_key=idempotency_key,
                operation_id=operation_id,
                error=error,
            ),
            what="give-up",
        )

    def close(self) -> None:
        self.pool.close()


def bootstrap(
    settings: Settings | None = None, *, pool_size: int | None = None, retry: RetryPolicy | None = None
) -> LedgerService:
    settings = settings or Settings.from_env()
    pool = open_pool(settings, min_size=min(2, pool_size or 2), max_size=pool_size)
    return LedgerService(settings, pool, PostgresQueries(pool), retry or RetryPolicy())
