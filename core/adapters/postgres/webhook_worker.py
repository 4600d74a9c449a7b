"""The webhook worker's statements: fan-out of events into deliveries (synchronous, on the consumer's thread)
and the delivery loop's claim and record (asynchronous, psycopg's async pool, on the event loop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, Connection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from core.adapters.postgres.db import connect_kwargs
from core.adapters.postgres.uow import rows_json
from core.application.ports import ADMIN_EVENT_PREFIX
from core.application.webhooks import AttemptResult, NextStep
from core.settings import Settings

NOTIFY_CHANNEL = "cleanledger_webhooks"  # new or resent deliveries are due: wake the delivery loops

# One statement per batch of events: a delivery for each live endpoint of the event's tenant subscribed to its
# type ('*', the type itself, or its family 'transaction.*'). An event seen again (redelivered by RabbitMQ,
# republished by the relay) meets the unique (endpoint, event) and adds nothing. Administrative events
# (ADMIN_EVENT_PREFIX) are for the audit trail alone: no endpoint gets them, '*' included.
FAN_OUT = (
    "WITH inserted AS ("
    " INSERT INTO webhook_deliveries (id, endpoint_id, tenant_id, event_id, event_type, payload, expires_at)"
    " SELECT gen_random_uuid(), e.id, ev.tn, ev.i, ev.t, ev.p, now() + make_interval(secs => %s)"
    " FROM json_to_recordset(%s::json) AS ev(i uuid, t text, tn text, p jsonb)"
    " JOIN webhook_endpoints e ON e.tenant_id = ev.tn AND e.deleted_at IS NULL"
    f"  AND NOT starts_with(ev.t, '{ADMIN_EVENT_PREFIX}')"
    "  AND EXISTS (SELECT 1 FROM unnest(e.event_types) AS w(t)"
    "   WHERE w.t = '*' OR w.t = ev.t OR (right(w.t, 2) = '.*' AND starts_with(ev.t, left(w.t, -1))))"
    " ON CONFLICT (endpoint_id, event_id) DO NOTHING RETURNING 1)"
    " SELECT count(*) FROM inserted"
)

# Due deliveries not locked by another worker, fairly: the endpoints with something due (longest waiting first,
# those this worker has no room for left out), then at most `per_endpoint` of each. However many deliveries a
# dead endpoint has piled up, it never fills a claim and hides the others' behind it.
SELECT_DUE = (
    "WITH ready AS (SELECT endpoint_id FROM webhook_deliveries"
    "  WHERE status = 'pending' AND next_attempt_at <= now() AND NOT (endpoint_id = ANY(%(busy)s))"
    "  GROUP BY endpoint_id ORDER BY min(next_attempt_at) LIMIT %(endpoints)s)"
    " SELECT d.id, d.endpoint_id, d.event_type, d.payload::text, d.attempts, d.expires_at, e.url, e.secret"
    " FROM ready CROSS JOIN LATERAL (SELECT * FROM webhook_deliveries w"
    "   WHERE w.endpoint_id = ready.endpoint_id AND w.status = 'pending' AND w.next_attempt_at <= now()"
    "   ORDER BY w.next_attempt_at LIMIT %(per_endpoint)s FOR UPDATE SKIP LOCKED) AS d"
    " JOIN webhook_endpoints e ON e.id = d.endpoint_id"
    " ORDER BY d.next_attempt_at"
)
# The claimed ones are leased: not due again until the attempt's outcome is recorded, or the lease runs out
# (the worker died mid-attempt: another one tries again).
LEASE = "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => %s) WHERE id = ANY(%s)"
RECORD = (
    "UPDATE webhook_deliveries SET attempts = %(attempt)s, status = %(status)s,"
    " next_attempt_at = coalesce(%(next)s, next_attempt_at), last_status = %(code)s, last_error = %(error)s,"
    " completed_at = CASE WHEN %(status)s = 'pending' THEN NULL ELSE now() END"
    " WHERE id = %(id)s AND status = 'pending' RETURNING id"
)
RECORD_ATTEMPT = (
    "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, latency_ms, error)"
    " VALUES (%(id)s, %(attempt)s, %(at)s, %(code)s, %(latency)s, %(error)s)"
    " ON CONFLICT (delivery_id, attempt) DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class Due:
    id: UUID
    endpoint_id: UUID
    event_type: str
    body: str  # the event document as JSON text, sent as it is: never parsed and written again (exact numbers)
    attempts: int  # made so far
    expires_at: datetime
    url: str
    secret: str


def fan_out(conn: Connection[TupleRow], events: Sequence[dict[str, Any]], *, retry_window_s: int) -> int:
    """Insert the deliveries of `events` (event documents as published) and commit; returns how many."""
    rows = [{"i": e["id"], "t": e["type"], "tn": e["tenant_id"], "p": e} for e in events]
    with conn.transaction():
        row = conn.execute(FAN_OUT, (retry_window_s, rows_json(rows))).fetchone()
        created = int(row[0]) if row else 0
        if created:
            conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return created


async def open_async_pool(settings: Settings, *, max_size: int) -> AsyncConnectionPool:
    pool: AsyncConnectionPool = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        kwargs={**connect_kwargs(settings), "autocommit": True},
        open=False,
        name="cleanledger-webhooks",
    )
    await pool.open(wait=True, timeout=30)
    return pool


async def claim_due(
    pool: AsyncConnectionPool,
    *,
    busy: Sequence[UUID],
    room: dict[UUID, int],
    default_room: int,
    limit: int,
    lease_s: float,
) -> list[Due]:
    """Claim up to `limit` due deliveries, at most `room[endpoint]` (else `default_room`) per endpoint, leasing
    them for `lease_s` seconds; endpoints in `busy` are skipped. Rows left over stay due for others."""
    async with pool.connection() as conn, conn.transaction():
        params = {"busy": list(busy), "endpoints": limit, "per_endpoint": max(default_room, 1)}
        rows = await (await conn.execute(SELECT_DUE, params)).fetchall()
        picked: list[Due] = []
        left = dict(room)
        for row in rows:
            endpoint = row[1]
            if left.setdefault(endpoint, default_room) <= 0:
                continue
            left[endpoint] -= 1
            picked.append(Due(*row))
            if len(picked) >= limit:
                break
        if picked:
            await conn.execute(LEASE, (lease_s, [d.id for d in picked]))
    return picked


async def record_attempt(
    pool: AsyncConnectionPool, due: Due, result: AttemptResult, step: NextStep, attempted_at: datetime
) -> bool:
    """Store the attempt and the delivery's new state in one transaction; False if the delivery was no longer
    pending (its endpoint deleted meanwhile)."""
    params = {
        "id": due.id,
        "attempt": due.attempts + 1,
        "status": step.status,
        "next": step.next_attempt_at,
        "code": result.status_code,
        "error": result.error,
        "at": attempted_at,
        "latency": result.latency_ms,
    }
    async with pool.connection() as conn, conn.transaction():
        updated = await (await conn.execute(RECORD, params)).fetchone()
        if updated is None:
            return False
        await conn.execute(RECORD_ATTEMPT, params)
    return True


async def listen(settings: Settings) -> AsyncConnection[TupleRow]:
    conn = await AsyncConnection.connect(settings.database_url, autocommit=True, application_name="cleanledger")
    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return conn
