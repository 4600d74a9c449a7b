"""Queue bookkeeping of operations: when a command was confirmed by RabbitMQ, and which pending operations
may never have reached it. Used by the ingress and the redelivery sweeper; the posting path never is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool


@dataclass(frozen=True, slots=True)
class EnqueueState:
    confirmed: bool  # RabbitMQ confirmed the command at least once
    age_s: float  # seconds since the operation was recorded, by the database's clock


def mark_enqueued(pool: ConnectionPool, operation_id: UUID) -> None:
    """Record that RabbitMQ confirmed the operation's command (ingress, after the publish)."""
    with pool.connection() as conn:
        mark_enqueued_in(conn, operation_id)


def enqueue_state(pool: ConnectionPool, tenant_id: str, operation_id: UUID) -> EnqueueState | None:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT last_enqueued_at IS NOT NULL, extract(epoch FROM now() - created_at)::float8"
            " FROM operations WHERE id = %s AND tenant_id = %s",
            (operation_id, tenant_id),
        ).fetchone()
    return EnqueueState(row[0], row[1]) if row else None


def lock_stale_pending(conn: Connection[TupleRow], *, older_than_s: float, limit: int) -> list[tuple[UUID, str, Any]]:
    """(operation id, idempotency key, request) of pending operations neither confirmed nor re-enqueued in the
    last `older_than_s` seconds, locked for the caller's transaction (other sweepers skip them)."""
    return conn.execute(
        "SELECT o.id, k.key, o.request FROM idempotency_keys k JOIN operations o ON o.id = k.operation_id"
        " WHERE k.status = 'pending'"
        " AND coalesce(o.last_enqueued_at, o.created_at) < now() - make_interval(secs => %s)"
        " ORDER BY coalesce(o.last_enqueued_at, o.created_at) LIMIT %s FOR UPDATE OF o SKIP LOCKED",
        (older_than_s, limit),
    ).fetchall()


def mark_enqueued_in(conn: Connection[TupleRow], operation_id: UUID) -> None:
    """`mark_enqueued` inside the caller's transaction (the sweeper's)."""
    conn.execute("UPDATE operations SET last_enqueued_at = now() WHERE id = %s", (operation_id,))
