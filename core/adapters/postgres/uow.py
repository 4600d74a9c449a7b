"""PostgreSQL unit of work: one SERIALIZABLE transaction per use-case call, in pipeline mode.

Round trips on the hot path (a fresh posting): BEGIN + idempotency claim (1), account locks (1), then
transaction, entries, balances, key, outbox and COMMIT queued together and flushed at commit (1).
SQLSTATE 40001 (serialization failure), 40P01 (deadlock) and 55P03 (lock timeout) become
`TransientConflict` so the application's retry policy re-runs the whole unit.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import psycopg
from psycopg import Connection, IsolationLevel
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from core.application.commands import Command
from core.application.ports import (
    AccountRepository,
    Event,
    ExistingKey,
    IdempotencyStore,
    Ledger,
    Outbox,
    UnitOfWork,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import TransientConflict
from core.domain.ids import external_account_id
from core.domain.model import Account, AccountKind, AccountStatus, OverdraftPolicy, Transaction

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

ACCOUNT_COLUMNS = (
    "id, tenant_id, currency, kind, overdraft_limit, status, posted_balance, version, metadata, created_at"
)


def account_from_row(row: Sequence[Any]) -> Account:
    return Account(
        id=row[0],
        tenant_id=row[1],
        currency=row[2],
        kind=AccountKind(row[3]),
        overdraft=OverdraftPolicy(row[4]),
        status=AccountStatus(row[5]),
        balance=row[6],
        version=row[7],
        metadata=row[8],
        created_at=row[9],
    )


def operation_from_row(operation_id: UUID, status: str, response: dict[str, Any] | None) -> OperationResult:
    response = response or {}
    return OperationResult(operation_id, OperationStatus(status), response.get("result"), response.get("problem"))


def raise_if_retryable(exc: psycopg.Error) -> None:
    """Map PostgreSQL's "try again" errors to the application's TransientConflict."""
    if exc.sqlstate in RETRYABLE_SQLSTATES:
        raise TransientConflict(f"{exc.sqlstate}: {exc.diag.message_primary}") from exc


class PostgresAccounts(AccountRepository):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def add(self, account: Account) -> bool:
        row = self.conn.execute(
            "INSERT INTO accounts (id, tenant_id, currency, kind, overdraft_limit, status, metadata,"
            " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
            (
                account.id,
                account.tenant_id,
                account.currency,
                str(account.kind),
                account.overdraft.limit,
                str(account.status),
                Jsonb(account.metadata),
                account.created_at,
            ),
        ).fetchone()
        return row is not None

    def lock(self, tenant_id: str, ids: Collection[UUID]) -> dict[UUID, Account]:
        # ORDER BY id: every transaction takes its locks in the same global order, so A->B and B->A
        # transfers queue behind each other instead of deadlocking.
        rows = self.conn.execute(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY(%s) AND tenant_id = %s ORDER BY id FOR UPDATE",
            (list(ids), tenant_id),
        ).fetchall()
        return {row[0]: account_from_row(row) for row in rows}

    def ensure_external(self, tenant_id: str, currency: str) -> None:
        self.conn.execute(
            "INSERT INTO accounts (id, tenant_id, currency, kind, system_role, overdraft_limit)"
            " VALUES (%s, %s, %s, 'system', 'external', NULL) ON CONFLICT DO NOTHING",
            (external_account_id(tenant_id, currency), tenant_id, currency),
        )

    def save_status(self, account: Account) -> None:
        self.conn.execute(
            "UPDATE accounts SET status = %s, updated_at = now() WHERE id = %s",
            (str(account.status), account.id),
        )


class PostgresLedger(Ledger):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def append(self, transaction: Transaction, accounts: Sequence[Account], *, operation_id: UUID) -> None:
        tx = transaction
        cur = self.conn.cursor()
        cur.execute(
            "INSERT INTO transactions (id, tenant_id, kind, operation_id, metadata, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (tx.id, tx.tenant_id, str(tx.kind), operation_id, Jsonb(dict(tx.metadata)), tx.created_at),
        )
        entries = tx.entries
        cur.execute(
            "INSERT INTO entries (transaction_id, account_id, sequence, amount, currency, balance_after,"
            " created_at) SELECT %s, a, s, m, c, b, %s"
            " FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::text[], %s::bigint[]) AS u(a, s, m, c, b)",
            (
                tx.id,
                tx.created_at,
                [e.account_id for e in entries],
                [e.sequence for e in entries],
                [e.amount for e in entries],
                [e.currency for e in entries],
                [e.balance_after for e in entries],
            ),
        )
        cur.execute(
            "UPDATE accounts SET posted_balance = u.b, version = u.v, updated_at = %s"
            " FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS u(id, b, v) WHERE accounts.id = u.id",
            (
                tx.created_at,
                [a.id for a in accounts],
                [a.balance for a in accounts],
                [a.version for a in accounts],
            ),
        )


class PostgresIdempotency(IdempotencyStore):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def claim(self, command: Command, *, key: str, fingerprint: str, operation_id: UUID) -> ExistingKey | None:
        # One statement, one round trip, whether the key is new (sync path) or was recorded by the ingress
        # (queue path): the CTE inserts the key and its operation, or else the last SELECT returns the
        # existing key. That SELECT only runs when the insert did nothing, so a fresh claim reads no index
        # page (a SERIALIZABLE predicate lock there would make unrelated claims conflict). A concurrent
        # claim of the same key makes the INSERT wait, then fail with 40001 once the other commits; the
        # retry finds the key and replays. Two deliveries settling one pending key both update its row and
        # lock the same accounts, so SERIALIZABLE lets only one of them commit.
        row = self.conn.execute(
            "WITH claimed AS ("
            "  INSERT INTO idempotency_keys (tenant_id, key, fingerprint, operation_id)"
            "  VALUES (%(tenant)s, %(key)s, %(fp)s, %(op)s)"
            "  ON CONFLICT DO NOTHING RETURNING operation_id"
            "), op AS ("
            "  INSERT INTO operations (id, tenant_id, command_type, request)"
            "  SELECT operation_id, %(tenant)s, %(type)s, %(request)s FROM claimed RETURNING id"
            ") SELECT true, NULL, NULL, NULL, NULL FROM op"
            " UNION ALL"
            " SELECT false, fingerprint, operation_id, status, response FROM idempotency_keys"
            " WHERE tenant_id = %(tenant)s AND key = %(key)s AND NOT EXISTS (SELECT 1 FROM claimed)",
            {
                "tenant": command.tenant_id,
                "key": key,
                "fp": fingerprint,
                "op": operation_id,
                "type": command.type,
                "request": Jsonb(command.to_json()),
            },
        ).fetchone()
        if row is None:  # the conflicting claim rolled back while we waited on it
            raise TransientConflict("idempotency key claim raced with a rollback")
        claimed, fp, op_id, status, response = row
        if claimed:
            return None
        return ExistingKey(fp, operation_from_row(op_id, status, response))

    def complete(self, tenant_id: str, key: str, outcome: OperationResult) -> None:
        self.conn.execute(
            "UPDATE idempotency_keys SET status = %s, response = %s, settled_at = now()"
            " WHERE tenant_id = %s AND key = %s",
            (str(outcome.status), Jsonb(outcome.outcome_json()), tenant_id, key),
        )

    def release(self, tenant_id: str, key: str, operation_id: UUID) -> None:
        self.conn.execute(
            "WITH gone AS (DELETE FROM idempotency_keys WHERE tenant_id = %s AND key = %s AND operation_id = %s"
            " AND status = 'pending' RETURNING operation_id)"
            " DELETE FROM operations WHERE id IN (SELECT operation_id FROM gone)",
            (tenant_id, key, operation_id),
        )


class PostgresOutbox(Outbox):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def stage(self, event: Event) -> None:
        self.conn.execute(
            "INSERT INTO outbox (event_id, event_type, tenant_id, payload, occurred_at) VALUES (%s, %s, %s, %s, %s)",
            (event.id, event.type, event.tenant_id, Jsonb(event.payload), event.occurred_at),
        )


class PostgresUnitOfWork(UnitOfWork):
    """Borrows a pooled connection for one SERIALIZABLE transaction and gives it back on exit."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def __enter__(self) -> Self:
        self._stack = ExitStack()
        self.conn: Connection[TupleRow] = self._stack.enter_context(self.pool.connection())
        self.conn.isolation_level = IsolationLevel.SERIALIZABLE
        self._stack.enter_context(self.conn.pipeline())
        self.idempotency = PostgresIdempotency(self.conn)
        self.accounts = PostgresAccounts(self.conn)
        self.ledger = PostgresLedger(self.conn)
        self.outbox = PostgresOutbox(self.conn)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.rollback()
        except psycopg.Error:
            if exc is None:
                raise
        finally:
            self._stack.__exit__(exc_type, exc, tb)
        if isinstance(exc, psycopg.Error):
            raise_if_retryable(exc)

    def commit(self) -> None:
        try:
            self.conn.commit()
        except psycopg.Error as exc:
            raise_if_retryable(exc)
            raise

    def rollback(self) -> None:
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.conn.rollback()
