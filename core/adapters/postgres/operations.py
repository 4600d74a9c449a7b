"""Operations as the ingress sees them (async, on the event loop): recorded pending before their command is
queued, withdrawn if the queue refused it, read back while pending or settled. And the redelivery sweeper's
bookkeeping (sync): which pending operations may never have reached the queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from psycopg import Connection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from core.adapters.postgres.queries import OPERATION
from core.adapters.postgres.uow import (
    CLAIM_KEYS,
    claims_json,
    existing_keys,
    operation_from_row,
    raise_translated,
    rows_json,
)
from core.application.ports import Claim, ExistingKey, OperationRecords
from core.application.views import OperationResult

# Deletes claims and their operations while still pending: one a worker settled was queued after all.
WITHDRAW = (
    "WITH gone AS (DELETE FROM idempotency_keys k USING json_to_recordset(%s::json) AS w(t text, k text, op uuid)"
    " WHERE k.tenant_id = w.t AND k.key = w.k AND k.operation_id = w.op AND k.status = 'pending'"
    " RETURNING k.operation_id)"
    " DELETE FROM operations WHERE id IN (SELECT operation_id FROM gone)"
)
FIND = (
    "SELECT k.operation_id, k.status, k.response FROM idempotency_keys k WHERE k.operation_id = %s AND k.tenant_id = %s"
)


class PostgresOperationRecords(OperationRecords):
    """Each call is one autocommit statement on a pooled async connection: one round trip, one commit
    (READ COMMITTED; the key's primary key is what makes a claim unique)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def record(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        rows = await self._fetch(CLAIM_KEYS, (claims_json(claims),))
        return existing_keys(claims, rows)

    async def withdraw(self, claims: Sequence[Claim]) -> None:
        withdrawn = rows_json([{"t": c.tenant_id, "k": c.key, "op": c.operation_id} for c in claims])
        await self._fetch(WITHDRAW, (withdrawn,), returns_rows=False)

    async def find(self, tenant_id: str, operation_id: UUID) -> OperationResult | None:
        rows = await self._fetch(OPERATION, (operation_id, tenant_id))
        return operation_from_row(*rows[0]) if rows else None

    async def _fetch(self, sql: str, params: Sequence[Any], *, returns_rows: bool = True) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchall() if returns_rows else []
        except psycopg.Error as exc:
            raise_translated(exc)
            raise


def lock_stale_pending(conn: Connection[TupleRow], *, older_than_s: float, limit: int) -> list[tuple[UUID, str, Any]]:
    """(operation id, idempotency key, request) of pending operations neither recorded nor re-queued in the
    last `older_than_s` seconds, locked for the caller's transaction (other sweepers skip them)."""
    return conn.execute(
        "SELECT o.id, k.key, o.request FROM idempotency_keys k JOIN operations o ON o.id = k.operation_id"
        " WHERE k.status = 'pending'"
        " AND coalesce(o.last_enqueued_at, o.created_at) < now() - make_interval(secs => %s)"
        " ORDER BY coalesce(o.last_enqueued_at, o.created_at) LIMIT %s FOR UPDATE OF o SKIP LOCKED",
        (older_than_s, limit),
    ).fetchall()


def mark_enqueued_in(conn: Connection[TupleRow], operation_id: UUID) -> None:
    """Record, in the sweeper's transaction, that it queued the operation's command again."""
    conn.execute("UPDATE operations SET last_enqueued_at = now() WHERE id = %s", (operation_id,))


def oldest_pending_age_s(conn: Connection[TupleRow]) -> float:
    """Seconds since the oldest operation still pending was accepted (0.0: none pending); the partial index of
    pending keys answers it with one entry."""
    row = conn.execute(
        "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM idempotency_keys WHERE status = 'pending'"
    ).fetchone()
    return float(row[0]) if row else 0.0
