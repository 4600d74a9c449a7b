"""PostgreSQL unit of work: one SERIALIZABLE transaction per use-case call (one command or a whole group of
them), in pipeline mode.

A unit that declared its write set (the accounts it will write) first queues behind their other writers
on session advisory locks, taken in key order in autocommit before BEGIN (1 round trip). Only then does it
begin and take its snapshot, so it never meets a newer version of a row it locks: without this, every
writer that waited on a hot account's row lock would fail with 40001 "concurrent update" once the holder
committed, and hot accounts would turn into a lottery of retries. The row locks (`SELECT ... FOR UPDATE`)
are queued with BEGIN and sent with the idempotency claim (1). New accounts, transactions, entries,
balances, outcomes, outbox, COMMIT and the advisory unlock are queued together and flushed at commit (1).
Three round trips per unit, however many commands it settles.

SQLSTATE 40001 (serialization failure), 40P01 (deadlock) and 55P03 (lock timeout) become
`TransientConflict` so the application's retry policy re-runs the whole unit; a server that cannot be
reached becomes `StoreUnavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import psycopg
from psycopg import Connection, Cursor, Pipeline
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from core.application.ports import (
    AccountRepository,
    Claim,
    Completion,
    Event,
    ExistingKey,
    IdempotencyStore,
    Ledger,
    Outbox,
    Posting,
    StoreUnavailable,
    UnitOfWork,
    WriteSet,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import TransientConflict
from core.domain.model import Account, AccountKind, AccountStatus, OverdraftPolicy

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

ACCOUNT_COLUMNS = (
    "id, tenant_id, currency, kind, overdraft_limit, status, posted_balance, version, metadata, created_at"
)
# ORDER BY id: every transaction takes its row locks in the same global order, so A->B and B->A transfers
# queue behind each other instead of deadlocking.
# Whatever the tenant: the use case checks each account's owner, and a group may serve many tenants.
LOCK_ACCOUNTS = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY(%s) ORDER BY id FOR UPDATE"


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


def raise_translated(exc: psycopg.Error) -> None:
    """Map PostgreSQL's "try again" errors to the application's TransientConflict, and a server that cannot
    be reached (connection refused or lost, shut down, pool exhausted) to StoreUnavailable. A statement
    timeout stays what it is: the work itself was too slow, and waiting would not help it."""
    if exc.sqlstate in RETRYABLE_SQLSTATES:
        raise TransientConflict(f"{exc.sqlstate}: {exc.diag.message_primary}") from exc
    if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, psycopg.errors.QueryCanceled):
        raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc


def _json(value: object) -> str:
    """Compact JSON text, cast to jsonb in SQL: arrays of text travel where arrays of jsonb would not."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# Every write below is one statement for the whole group, whatever its size: rows travel as parallel
# arrays through unnest(), so the statement text never changes and stays prepared.
class PostgresAccounts(AccountRepository):
    def __init__(self, conn: Connection[TupleRow], *, prelocked: Cursor[TupleRow] | None = None) -> None:
        self.conn = conn
        self._prelocked_cursor = prelocked  # the write set's rows, locked as the unit began
        self._prelocked: dict[UUID, Account] | None = None

    def lock(self, ids: Collection[UUID]) -> dict[UUID, Account]:
        if self._prelocked_cursor is not None:
            if self._prelocked is None:
                self._prelocked = {row[0]: account_from_row(row) for row in self._prelocked_cursor.fetchall()}
            return {i: self._prelocked[i] for i in ids if i in self._prelocked}
        rows = self.conn.execute(LOCK_ACCOUNTS, (sorted(ids),)).fetchall()
        return {row[0]: account_from_row(row) for row in rows}

    def add(self, accounts: Sequence[Account]) -> None:
        self.conn.execute(
            "INSERT INTO accounts (id, tenant_id, currency, kind, system_role, overdraft_limit, status,"
            " posted_balance, version, metadata, created_at, updated_at)"
            " SELECT id, t, c, k, CASE WHEN k = 'system' THEN 'external' END, o, s, b, v, m::jsonb, at, at"
            " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::bigint[],"
            " %s::bigint[], %s::text[], %s::timestamptz[]) AS u(id, t, c, k, o, s, b, v, m, at)",
            (
                [a.id for a in accounts],
                [a.tenant_id for a in accounts],
                [a.currency for a in accounts],
                [str(a.kind) for a in accounts],
                [a.overdraft.limit for a in accounts],
                [str(a.status) for a in accounts],
                [a.balance for a in accounts],
                [a.version for a in accounts],
                [_json(a.metadata) for a in accounts],
                [a.created_at for a in accounts],
            ),
        )

    def save(self, accounts: Sequence[Account]) -> None:
        self.conn.execute(
            "UPDATE accounts SET posted_balance = u.b, version = u.v, status = u.s, updated_at = now()"
            " FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::text[]) AS u(id, b, v, s)"
            " WHERE accounts.id = u.id",
            (
                [a.id for a in accounts],
                [a.balance for a in accounts],
                [a.version for a in accounts],
                [str(a.status) for a in accounts],
            ),
        )


class PostgresLedger(Ledger):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def append(self, postings: Sequence[Posting]) -> None:
        transactions = [p.transaction for p in postings]
        entries = [(tx, e) for tx in transactions for e in tx.entries]
        cur = self.conn.cursor()
        cur.execute(
            "INSERT INTO transactions (id, tenant_id, kind, operation_id, metadata, created_at)"
            " SELECT id, t, k, o, m::jsonb, at"
            " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::timestamptz[])"
            " AS u(id, t, k, o, m, at)",
            (
                [tx.id for tx in transactions],
                [tx.tenant_id for tx in transactions],
                [str(tx.kind) for tx in transactions],
                [p.operation_id for p in postings],
                [_json(dict(tx.metadata)) for tx in transactions],
                [tx.created_at for tx in transactions],
            ),
        )
        cur.execute(
            "INSERT INTO entries (transaction_id, account_id, sequence, amount, currency, balance_after,"
            " created_at) SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::bigint[], %s::bigint[], %s::text[],"
            " %s::bigint[], %s::timestamptz[])",
            (
                [tx.id for tx, _ in entries],
                [e.account_id for _, e in entries],
                [e.sequence for _, e in entries],
                [e.amount for _, e in entries],
                [e.currency for _, e in entries],
                [e.balance_after for _, e in entries],
                [tx.created_at for tx, _ in entries],
            ),
        )


class PostgresIdempotency(IdempotencyStore):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def claim(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        # One statement, one round trip, for the whole group, whether its keys are new (sync path) or were
        # recorded by the ingress (queue path): the CTE inserts each new key and its operation, and the last
        # SELECT returns the keys that already existed. It looks only for keys the insert did not take, so a
        # fresh claim reads no index page (a SERIALIZABLE predicate lock there would make unrelated claims
        # conflict). A concurrent claim of the same key makes the INSERT wait, then fail with 40001 once the
        # other commits; the retry finds the key and replays. Two deliveries settling one pending key both
        # update its row and lock the same accounts, so SERIALIZABLE lets only one of them commit.
        rows = self.conn.execute(
            "WITH input AS ("
            "  SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::text[])"
            "  AS i(tenant, key, fp, op, type, request)"
            "), claimed AS ("
            "  INSERT INTO idempotency_keys (tenant_id, key, fingerprint, operation_id)"
            "  SELECT tenant, key, fp, op FROM input ON CONFLICT DO NOTHING RETURNING tenant_id, key, operation_id"
            "), recorded AS ("
            "  INSERT INTO operations (id, tenant_id, command_type, request)"
            "  SELECT i.op, i.tenant, i.type, i.request::jsonb FROM input i JOIN claimed c ON c.operation_id = i.op"
            ") SELECT k.tenant_id, k.key, k.fingerprint, k.operation_id, k.status, k.response"
            " FROM input i JOIN idempotency_keys k ON k.tenant_id = i.tenant AND k.key = i.key"
            " WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.tenant_id = i.tenant AND c.key = i.key)"
            " UNION ALL SELECT tenant_id, key, NULL, NULL, NULL, NULL FROM claimed",
            (
                [c.tenant_id for c in claims],
                [c.key for c in claims],
                [c.fingerprint for c in claims],
                [c.operation_id for c in claims],
                [c.command_type for c in claims],
                [_json(c.request) for c in claims],
            ),
        ).fetchall()
        if len(rows) != len(claims):  # a conflicting claim rolled back while we waited on it
            raise TransientConflict("idempotency key claim raced with a rollback")
        return {
            (tenant, key): ExistingKey(fp, operation_from_row(op_id, status, response))
            for tenant, key, fp, op_id, status, response in rows
            if fp is not None
        }

    def complete(self, completions: Sequence[Completion]) -> None:
        self.conn.execute(
            "UPDATE idempotency_keys k SET status = u.s, response = u.r::jsonb, settled_at = now()"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS u(t, k, s, r)"
            " WHERE k.tenant_id = u.t AND k.key = u.k",
            (
                [c.tenant_id for c in completions],
                [c.key for c in completions],
                [str(c.outcome.status) for c in completions],
                [_json(c.outcome.outcome_json()) for c in completions],
            ),
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

    def stage(self, events: Sequence[Event]) -> None:
        self.conn.execute(
            "INSERT INTO outbox (event_id, event_type, tenant_id, payload, occurred_at)"
            " SELECT i, t, tn, p::jsonb, at FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[],"
            " %s::timestamptz[]) AS u(i, t, tn, p, at)",
            (
                [e.id for e in events],
                [e.type for e in events],
                [e.tenant_id for e in events],
                [_json(e.payload) for e in events],
                [e.occurred_at for e in events],
            ),
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
        try:
            self.conn: Connection[TupleRow] = self._borrowed.__enter__()
        except psycopg.Error as exc:  # the pool's timeout included
            raise_translated(exc)
            raise
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
            # One statement for the whole set; PostgreSQL evaluates a volatile target list after ORDER BY,
            # so the locks are taken in key order (the array is sorted too) and two units never deadlock.
            keys = sorted({advisory_key(account_id) for account_id in write_set.account_ids})
            self.conn.execute("SELECT pg_advisory_lock(k) FROM unnest(%s::bigint[]) AS k ORDER BY k", (keys,))
        pipeline = self._pipeline = self.conn.pipeline()
        pipeline.__enter__()
        self.conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE", prepare=False)
        # Point lookups by primary key must stay index scans even on a small table: a sequential scan would
        # take a relation-wide SIREAD lock and make every concurrent writer of the table a conflict.
        self.conn.execute("SELECT set_config('enable_seqscan', 'off', true)", prepare=False)
        if write_set is None:
            return None
        return self.conn.execute(LOCK_ACCOUNTS, (sorted(write_set.account_ids),))

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
            raise_translated(errors[0])
            raise errors[0]
        if isinstance(exc, psycopg.Error):
            raise_translated(exc)

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
            raise_translated(exc)
            raise

    def rollback(self) -> None:
        self._end("ROLLBACK")
