"""The webhook worker's statements: fan-out of events into deliveries (synchronous, on the consumer's thread)
and the delivery loop's claim and record (asynchronous, psycopg's async pool, on the event loop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import orjson
import structlog
from psycopg import AsyncConnection, Connection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from core.adapters import json_text
from core.adapters.postgres.db import connect_kwargs
from core.adapters.postgres.uow import rows_json
from core.application.ports import ADMIN_EVENT_PREFIX
from core.application.webhooks import AttemptResult, NextStep
from core.settings import Settings

log = structlog.get_logger(__name__)
NOTIFY_CHANNEL = "cleanledger_webhooks"  # new or resent deliveries are due: wake the delivery loops

# Which endpoints want an event: live ones of the event's tenant subscribed to its type ('*', the type itself, or
# its family 'transaction.*'). Administrative events (ADMIN_EVENT_PREFIX) are for the audit trail alone: no
# endpoint gets them, '*' included. `ev` is the event (tn: tenant, t: type), `e` the endpoint.
SUBSCRIBES = (
    "e.tenant_id = ev.tn AND e.deleted_at IS NULL"
    f" AND NOT starts_with(ev.t, '{ADMIN_EVENT_PREFIX}')"
    " AND EXISTS (SELECT 1 FROM unnest(e.event_types) AS w(t)"
    "  WHERE w.t = '*' OR w.t = ev.t OR (right(w.t, 2) = '.*' AND starts_with(ev.t, left(w.t, -1))))"
)
# The (tenant, type) pairs of a batch of events that some endpoint wants. Asked first, with no event's body: a
# batch's snapshot may be half a megabyte, and most events have no endpoint to go to.
SUBSCRIBED = (
    "SELECT DISTINCT ev.tn, ev.t FROM json_to_recordset(%s::json) AS ev(tn text, t text)"
    f" WHERE EXISTS (SELECT 1 FROM webhook_endpoints e WHERE {SUBSCRIBES})"
)
# Then one statement for the events that are wanted: a delivery for each endpoint that wants it. An event seen
# again (redelivered by RabbitMQ, republished by the relay) meets the unique (endpoint, event) and adds nothing.
# A new delivery is leased from the start to the worker that creates it, which attempts it without claiming it
# first; returned with what its attempt needs.
FAN_OUT = (
    "WITH inserted AS ("
    " INSERT INTO webhook_deliveries"
    "  (id, endpoint_id, tenant_id, event_id, event_type, payload, expires_at, next_attempt_at)"
    " SELECT gen_random_uuid(), e.id, ev.tn, ev.i, ev.t, ev.p::jsonb, now() + make_interval(secs => %(window)s),"
    "  now() + make_interval(secs => %(lease)s)"
    " FROM json_to_recordset(%(events)s::json) AS ev(i uuid, t text, tn text, p text)"
    f" JOIN webhook_endpoints e ON {SUBSCRIBES}"
    " ON CONFLICT (endpoint_id, event_id) DO NOTHING"
    " RETURNING id, endpoint_id, event_type, payload, attempts, expires_at)"
    " SELECT i.id, i.endpoint_id, i.event_type, i.payload::text, i.attempts, i.expires_at, e.url, e.secret"
    " FROM inserted i JOIN webhook_endpoints e ON e.id = i.endpoint_id"
)
# Leased deliveries the worker will not attempt itself after all (too many queued for one endpoint, or it is
# stopping): due now, for any worker's claim.
RELEASE = "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = ANY(%s) AND status = 'pending'"

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
# Attempts' outcomes, many in one statement: each delivery still pending takes its new state and its attempt joins
# the history; one no longer pending (its endpoint deleted meanwhile) records nothing. An attempt recorded twice
# (a retried statement that had committed) meets the unique (delivery, attempt).
RECORD = (
    "WITH a AS (SELECT * FROM json_to_recordset(%s::json) AS a(id uuid, attempt int, status text, next timestamptz,"
    "  code int, error text, at timestamptz, latency double precision)),"
    " updated AS (UPDATE webhook_deliveries d SET attempts = a.attempt, status = a.status,"
    "  next_attempt_at = coalesce(a.next, d.next_attempt_at), last_status = a.code, last_error = a.error,"
    "  completed_at = CASE WHEN a.status = 'pending' THEN NULL ELSE now() END"
    "  FROM a WHERE d.id = a.id AND d.status = 'pending' RETURNING d.id)"
    " INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, latency_ms, error)"
    " SELECT a.id, a.attempt, a.at, a.code, a.latency, a.error FROM a JOIN updated USING (id)"
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


@dataclass(frozen=True, slots=True)
class EventMessage:
    """An event as the fan-out takes it from RabbitMQ: what decides its deliveries, and its body untouched."""

    id: UUID
    type: str
    tenant_id: str
    body: bytes  # the event document, JSON: a JSON object (checked by the fan-out before it is stored)


def fan_out(
    conn: Connection[TupleRow], events: Sequence[EventMessage], *, retry_window_s: int, lease_s: float
) -> list[Due]:
    """Insert the deliveries of `events`, leased for `lease_s` seconds, and commit; returns them. NOTIFY wakes
    the other workers only when some are due for them (none here). The body of an event no endpoint wants is
    never parsed, nor sent to PostgreSQL; one that is wanted but is not a JSON object is dropped with a warning."""
    pairs = orjson.dumps([{"tn": e.tenant_id, "t": e.type} for e in events]).decode()
    with conn.transaction():
        wanted = {(row[0], row[1]) for row in conn.execute(SUBSCRIBED, (pairs,)).fetchall()}
        rows = [
            {"i": e.id, "t": e.type, "tn": e.tenant_id, "p": e.body.decode()}
            for e in events
            if (e.tenant_id, e.type) in wanted and _json_object(e)
        ]
        if not rows:
            return []
        params = {"window": retry_window_s, "lease": lease_s, "events": rows_json(rows)}
        return [Due(*row) for row in conn.execute(FAN_OUT, params).fetchall()]


def _json_object(event: EventMessage) -> bool:
    try:
        if isinstance(json_text.loads(event.body), dict):
            return True
    except ValueError:
        pass
    log.warning("webhooks.event_invalid", event_id=str(event.id), error="the body is not a JSON object")
    return False


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


@dataclass(frozen=True, slots=True)
class Attempted:
    """One attempt's outcome, to record."""

    due: Due
    result: AttemptResult
    step: NextStep
    attempted_at: datetime


async def record_attempts(pool: AsyncConnectionPool, attempts: Sequence[Attempted]) -> None:
    """Store the attempts and their deliveries' new states, in one statement and one commit."""
    rows = [
        {
            "id": a.due.id,
            "attempt": a.due.attempts + 1,
            "status": a.step.status,
            "next": a.step.next_attempt_at,
            "code": a.result.status_code,
            "error": a.result.error,
            "at": a.attempted_at,
            "latency": a.result.latency_ms,
        }
        for a in attempts
    ]
    async with pool.connection() as conn:
        await conn.execute(RECORD, (rows_json(rows),))  # autocommit: one statement, one commit


async def renew_leases(pool: AsyncConnectionPool, delivery_ids: Sequence[UUID], *, lease_s: float) -> None:
    """Extend the leases of deliveries still pending, by `lease_s` seconds from now."""
    async with pool.connection() as conn:
        await conn.execute(LEASE, (lease_s, list(delivery_ids)))


async def release(pool: AsyncConnectionPool, delivery_ids: Sequence[UUID]) -> None:
    """Make leased deliveries due now, for any worker to claim."""
    async with pool.connection() as conn:
        await conn.execute(RELEASE, (list(delivery_ids),))
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))


async def listen(settings: Settings) -> AsyncConnection[TupleRow]:
    conn = await AsyncConnection.connect(settings.database_url, autocommit=True, application_name="cleanledger")
    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return conn
