"""PostgreSQL unit of work: one SERIALIZABLE transaction per use-case call, in pipeline mode.

A unit that declared its write set (the accounts it will write) first queues behind their other writers
on session advisory locks, taken in key order in autocommit before BEGIN (1 round trip). Only then does it
begin and take its snapshot, so it never meets a newer version of a row it locks: without this, every
writer that waited on a hot account's row lock would fail with 40001 "concurrent update" once the holder
committed, and hot accounts would turn into a lottery of retries. The row locks (`SELECT ... FOR UPDATE`)
are queued with BEGIN and sent with the idempotency claim (1). Transaction, entries, balances, key,
outbox, COMMIT and the advisory unlock are queued together and flushed at commit (1).

SQLSTATE 40001 (serialization failure), 40P01 (deadlock) and 55P03 (lock timeout) become
`TransientConflict` so the application's retry policy re-runs the whole unit.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import psycopg
from psycopg import Connection, Cursor, Pipeline
from psycopg.pq import TransactionStatus
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
    WriteSet,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import TransientConflict
from core.domain.ids import external_account_id
from core.domain.model import Account, AccountKind, AccountStatus, OverdraftPolicy, Transaction

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

ACCOUNT_COLUMNS = (
    "id, tenant_id, currency, kind, overdraft_limit, status, posted_balance, version, metadata, created_at"
)
# ORDER BY id: every transaction takes its row locks in the same global order, so A->B and B->A transfers
# queue behind each other instead of deadlocking.
LOCK_ACCOUNTS = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY(%s) AND tenant_id = %s ORDER BY id FOR UPDATE"


def advisory_key(account_id: UUID) -> int:
    """An account's session advisory lock key: its id's last 8 bytes as a signed bigint (random bits in
    both uuid7 and uuid5 ids). Two accounts sharing a key merely queue behind each other."""
    return int.from_bytes(account_id.bytes[8:], "big", signed=True)


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
    def __init__(self, conn: Connection[TupleRow], *, prelocked: Cursor[TupleRow] | None = None) -> None:
        self.conn = conn
        self._prelocked_cursor = prelocked  # the write set's rows, locked as the unit began
        self._prelocked: dict[UUID, Account] | None = None

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
        if self._prelocked_cursor is not None:
            if self._prelocked is None:
                self._prelocked = {row[0]: account_from_row(row) for row in self._prelocked_cursor.fetchall()}
            if all(account_id in self._prelocked for account_id in ids):
                return {account_id: self._prelocked[account_id] for account_id in ids}
        # Not all locked up front (an unknown id, or an external account created by this unit): ask again.
        rows = self.conn.execute(LOCK_ACCOUNTS, (list(ids), tenant_id)).fetchall()
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
    """Borrows a pooled connection for one SERIALIZABLE transaction and gives it back on exit.

    The connection runs in autocommit with explicit BEGIN/COMMIT so the advisory locks of the write set can
    be taken before the transaction starts. They are released with COMMIT or ROLLBACK; a connection that
    might still hold them is closed rather than returned to the pool.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def __enter__(self) -> Self:
        self._borrowed: AbstractContextManager[Connection[TupleRow]] = self.pool.connection()
        self.conn: Connection[TupleRow] = self._borrowed.__enter__()
        self._pipeline: AbstractContextManager[Pipeline] | None = None
        self._holds_advisory_locks = False
        try:
            prelocked = self._begin(self.write_set)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self.idempotency = PostgresIdempotency(self.conn)
        self.accounts = PostgresAccounts(self.conn, prelocked=prelocked)
        self.ledger = PostgresLedger(self.conn)
        self.outbox = PostgresOutbox(self.conn)
        return self

    def _begin(self, write_set: WriteSet | None) -> Cursor[TupleRow] | None:
        self.conn.autocommit = True  # reset_session turns it off again when the connection goes back
        if write_set is not None:
            self._holds_advisory_locks = True  # before asking: a timeout on the second key keeps the first
            with self.conn.pipeline():
                for key in sorted({advisory_key(account_id) for account_id in write_set.account_ids}):
                    self.conn.execute("SELECT pg_advisory_lock(%s)", (key,), prepare=False)
        pipeline = self._pipeline = self.conn.pipeline()
        pipeline.__enter__()
        self.conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE", prepare=False)
        # Point lookups by primary key must stay index scans even on a small table: a sequential scan would
        # take a relation-wide SIREAD lock and make every concurrent writer of the table a conflict.
        self.conn.execute("SELECT set_config('enable_seqscan', 'off', true)", prepare=False)
        if write_set is None:
            return None
        return self.conn.execute(LOCK_ACCOUNTS, (sorted(write_set.account_ids), write_set.tenant_id))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        errors: list[psycopg.Error] = []
        try:
            if self._pipeline is not None:
                pipeline, self._pipeline = self._pipeline, None
                try:
                    pipeline.__exit__(exc_type, exc, tb)  # flushes what is still queued; its errors surface here
                except psycopg.Error as error:
                    errors.append(error)
            if self.conn.info.transaction_status is TransactionStatus.INERROR:
                # psycopg's own rollback also forgets the prepared statements whose Parse the failed
                # pipeline skipped (the unlock and transaction control below are never prepared).
                self.conn.rollback()
            in_transaction = self.conn.info.transaction_status is not TransactionStatus.IDLE
            if in_transaction or self._holds_advisory_locks:
                self._end("ROLLBACK" if in_transaction else None)
        except psycopg.Error as error:
            errors.append(error)
        finally:
            if self._holds_advisory_locks and not self.conn.closed:
                self.conn.close()  # the pool discards it and the server drops its locks
            self._borrowed.__exit__(exc_type, exc, tb)
        if exc is None and errors:
            raise_if_retryable(errors[0])
            raise errors[0]
        if isinstance(exc, psycopg.Error):
            raise_if_retryable(exc)

    def _end(self, statement: str | None) -> None:
        """COMMIT or ROLLBACK, and drop the advisory locks, in one round trip."""
        with self.conn.pipeline():  # leaving it syncs: any error, a failed COMMIT included, raises here
            if statement is not None:
                self.conn.execute(statement, prepare=False)
            if self._holds_advisory_locks:
                self.conn.execute("SELECT pg_advisory_unlock_all()", prepare=False)
        self._holds_advisory_locks = False

    def commit(self) -> None:
        try:
            self._end("COMMIT")
        except psycopg.Error as exc:
            raise_if_retryable(exc)
            raise

    def rollback(self) -> None:
        self._end("ROLLBACK")
