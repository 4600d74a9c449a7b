"""Webhook endpoints, deliveries and the event catch-up feed on PostgreSQL (the ingress side, synchronous).
The delivery worker's own statements are in `core/adapters/postgres/webhook_worker.py`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import IsolationLevel, sql
from psycopg_pool import ConnectionPool

from core.application.ports import ADMIN_EVENT_PREFIX
from core.application.webhooks import (
    DeliveryPage,
    EventFilter,
    EventPage,
    StoredEvent,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookStore,
)
from core.domain.errors import RequestInvalid

ENDPOINT_COLUMNS = "id, tenant_id, url, event_types, description, created_at, secret_rolled_at"
DELIVERY_COLUMNS = (
    "d.id, d.endpoint_id, d.event_id, d.event_type, d.status, d.attempts,"
    " CASE WHEN d.status = 'pending' THEN d.next_attempt_at END, d.expires_at, d.last_status, d.last_error,"
    " d.created_at, d.completed_at"
)


def endpoint_from_row(row: Sequence[Any]) -> WebhookEndpoint:
    return WebhookEndpoint(row[0], row[1], row[2], tuple(row[3]), row[4], row[5], row[6])


def delivery_from_row(row: Sequence[Any], history: list[WebhookAttempt]) -> WebhookDelivery:
    return WebhookDelivery(
        id=row[0],
        endpoint_id=row[1],
        event_id=row[2],
        event_type=row[3],
        status=row[4],
        attempts=row[5],
        next_attempt_at=row[6],
        expires_at=row[7],
        last_status=row[8],
        last_error=row[9],
        created_at=row[10],
        completed_at=row[11],
        history=tuple(history),
    )


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _unb64(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise RequestInvalid("cursor is not one this API returned") from None


def filters_digest(filters: EventFilter) -> str:
    """Ties an events cursor to the filters it was issued for."""
    since, until = (stamp.isoformat() if stamp else None for stamp in (filters.since, filters.until))
    canonical = json.dumps([sorted(filters.types), since, until])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_event_cursor(position: int, filters: EventFilter) -> str:
    return _b64(f"e1|{position}|{filters_digest(filters)}")


def decode_event_cursor(cursor: str, filters: EventFilter) -> int:
    kind, _, rest = _unb64(cursor).partition("|")
    position, _, digest = rest.partition("|")
    if kind != "e1" or not position.isdigit():
        raise RequestInvalid("cursor is not one this API returned")
    if digest != filters_digest(filters):
        raise RequestInvalid("cursor was issued for other filters: send the same type, since and until with it")
    return int(position)


def encode_delivery_cursor(created_at: datetime, delivery_id: UUID) -> str:
    return _b64(f"d1|{created_at.isoformat()}|{delivery_id}")


def decode_delivery_cursor(cursor: str) -> tuple[datetime, UUID]:
    parts = _unb64(cursor).split("|")
    try:
        if len(parts) != 3 or parts[0] != "d1":
            raise ValueError(cursor)
        stamp = datetime.fromisoformat(parts[1])
        if stamp.tzinfo is None:
            raise ValueError("naive timestamp")
        return stamp, UUID(parts[2])
    except ValueError:
        raise RequestInvalid("cursor is not one this API returned") from None


class PostgresWebhooks(WebhookStore):
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def add_endpoint(self, endpoint: WebhookEndpoint, secret: str, *, max_per_tenant: int) -> bool:
        with self.pool.connection() as conn, conn.transaction():
            # One registration at a time per tenant, so the cap holds under concurrent requests.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('webhook_endpoints:' || %s))", (endpoint.tenant_id,))
            row = conn.execute(
                "SELECT count(*) FROM webhook_endpoints WHERE tenant_id = %s AND deleted_at IS NULL",
                (endpoint.tenant_id,),
            ).fetchone()
            if row is not None and row[0] >= max_per_tenant:
                return False
            conn.execute(
                "INSERT INTO webhook_endpoints (id, tenant_id, url, event_types, description, secret, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    endpoint.id,
                    endpoint.tenant_id,
                    endpoint.url,
                    list(endpoint.event_types),
                    endpoint.description,
                    secret,
                    endpoint.created_at,
                ),
            )
        return True

    def endpoints(self, tenant_id: str) -> list[WebhookEndpoint]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = %s AND deleted_at IS NULL"
                " ORDER BY id",
                (tenant_id,),
            ).fetchall()
        return [endpoint_from_row(row) for row in rows]

    def endpoint(self, tenant_id: str, endpoint_id: UUID) -> WebhookEndpoint | None:
        with self.pool.connection() as conn:
            row = conn.execute(
                f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints"
                " WHERE id = %s AND tenant_id = %s AND deleted_at IS NULL",
                (endpoint_id, tenant_id),
            ).fetchone()
        return endpoint_from_row(row) if row else None

    def set_secret(self, tenant_id: str, endpoint_id: UUID, secret: str) -> WebhookEndpoint | None:
        with self.pool.connection() as conn:
            row = conn.execute(
                "UPDATE webhook_endpoints SET secret = %s, secret_rolled_at = now()"
                f" WHERE id = %s AND tenant_id = %s AND deleted_at IS NULL RETURNING {ENDPOINT_COLUMNS}",
                (secret, endpoint_id, tenant_id),
            ).fetchone()
        return endpoint_from_row(row) if row else None

    def delete_endpoint(self, tenant_id: str, endpoint_id: UUID) -> bool:
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE webhook_endpoints SET deleted_at = now()"
                " WHERE id = %s AND tenant_id = %s AND deleted_at IS NULL RETURNING id",
                (endpoint_id, tenant_id),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE webhook_deliveries SET status = 'failed', completed_at = now(),"
                " last_error = 'endpoint deleted' WHERE endpoint_id = %s AND status = 'pending'",
                (endpoint_id,),
            )
        return True

    def deliveries(
        self, tenant_id: str, endpoint_id: UUID, *, limit: int, cursor: str | None, status: str | None
    ) -> DeliveryPage:
        conditions: list[sql.Composable] = [sql.SQL("d.endpoint_id = %(endpoint)s AND d.tenant_id = %(tenant)s")]
        params: dict[str, object] = {"endpoint": endpoint_id, "tenant": tenant_id, "limit": limit + 1}
        if status is not None:
            conditions.append(sql.SQL("d.status = %(status)s"))
            params["status"] = status
        if cursor is not None:
            params["c_time"], params["c_id"] = decode_delivery_cursor(cursor)
            conditions.append(sql.SQL("(d.created_at, d.id) < (%(c_time)s, %(c_id)s)"))
        query = sql.SQL(
            "SELECT {columns} FROM webhook_deliveries d WHERE {where}"
            " ORDER BY d.created_at DESC, d.id DESC LIMIT %(limit)s"
        ).format(columns=sql.SQL(DELIVERY_COLUMNS), where=sql.SQL(" AND ").join(conditions))
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ  # deliveries and attempts agree
            rows = conn.execute(query, params).fetchall()[: limit + 1]
            page = rows[:limit]
            history = self._attempts(conn, [row[0] for row in page])
        deliveries = [delivery_from_row(row, history.get(row[0], [])) for row in page]
        more = len(rows) > limit
        next_cursor = encode_delivery_cursor(deliveries[-1].created_at, deliveries[-1].id) if more else None
        return DeliveryPage(deliveries, next_cursor)

    def delivery(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID) -> WebhookDelivery | None:
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            row = conn.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d"
                " WHERE d.id = %s AND d.endpoint_id = %s AND d.tenant_id = %s",
                (delivery_id, endpoint_id, tenant_id),
            ).fetchone()
            if row is None:
                return None
            history = self._attempts(conn, [row[0]])
        return delivery_from_row(row, history.get(row[0], []))

    @staticmethod
    def _attempts(conn: Any, delivery_ids: list[UUID]) -> dict[UUID, list[WebhookAttempt]]:
        found: dict[UUID, list[WebhookAttempt]] = {}
        if not delivery_ids:
            return found
        for delivery_id, *fields in conn.execute(
            "SELECT delivery_id, attempt, attempted_at, status_code, latency_ms, error FROM webhook_attempts"
            " WHERE delivery_id = ANY(%s) ORDER BY delivery_id, attempt",
            (delivery_ids,),
        ).fetchall():
            found.setdefault(delivery_id, []).append(WebhookAttempt(*fields))
        return found

    def resend(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID, expires_at: datetime) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute(
                "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(), expires_at = %s,"
                " completed_at = NULL WHERE id = %s AND endpoint_id = %s AND tenant_id = %s AND status <> 'pending'"
                " RETURNING id",
                (expires_at, delivery_id, endpoint_id, tenant_id),
            ).fetchone()
            if row is not None:
                conn.execute("SELECT pg_notify('cleanledger_webhooks', '')")
        return row is not None

    def events(self, tenant_id: str, *, limit: int, cursor: str | None, filters: EventFilter) -> EventPage:
        # Administrative events are the audit trail's alone.
        conditions: list[sql.Composable] = [
            sql.SQL("tenant_id = %(tenant)s"),
            sql.SQL("NOT starts_with(event_type, %(admin)s)"),
        ]
        params: dict[str, object] = {"tenant": tenant_id, "limit": limit + 1, "admin": ADMIN_EVENT_PREFIX}
        if filters.types:
            conditions.append(sql.SQL("event_type = ANY(%(types)s)"))
            params["types"] = list(filters.types)
        if filters.since is not None:
            conditions.append(sql.SQL("occurred_at >= %(since)s"))
            params["since"] = filters.since
        if filters.until is not None:
            conditions.append(sql.SQL("occurred_at < %(until)s"))
            params["until"] = filters.until
        if cursor is not None:
            conditions.append(sql.SQL("position > %(after)s"))
            params["after"] = decode_event_cursor(cursor, filters)
        query = sql.SQL(
            "SELECT position, event_id, event_type, tenant_id, occurred_at, payload FROM outbox WHERE {where}"
            " ORDER BY position LIMIT %(limit)s"
        ).format(where=sql.SQL(" AND ").join(conditions))
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.READ_COMMITTED
            rows = conn.execute(query, params).fetchall()
        page = rows[:limit]
        events = [StoredEvent(row[1], row[2], row[3], row[4], row[5]) for row in page]
        next_cursor = encode_event_cursor(page[-1][0], filters) if page else cursor
        return EventPage(events, next_cursor, has_more=len(rows) > limit)
