"""API keys: created by the CLI, stored hashed, resolved to a tenant by the ingress."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from core.adapters.postgres.uow import PostgresOutbox
from core.application.ports import Event, StoreUnavailable
from core.domain.ids import new_id
from core.domain.model import validate_tenant_id
from core.domain.secrets import API_KEY_PREFIX as SECRET_PREFIX
from core.domain.secrets import VISIBLE_TOKEN_CHARS

# Characters of the secret kept in clear, to tell keys apart in listings and logs: the marker and the token's
# public part (what `core.domain.secrets.redact` leaves).
VISIBLE_PREFIX_CHARS = len(SECRET_PREFIX) + VISIBLE_TOKEN_CHARS


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: UUID
    tenant_id: str


def hash_secret(secret: str) -> str:
    # A fast hash is right here: the secret is 256 random bits, so there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(pool: ConnectionPool, tenant_id: str, *, name: str = "", actor: str = "") -> tuple[ApiKey, str]:
    """A new key for the tenant; returns it with its secret, which is not stored and cannot be shown again.
    `actor` says who asked, for the audit trail (the event `admin.api_key.created`, committed with the key)."""
    validate_tenant_id(tenant_id)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(new_id(), tenant_id)
    prefix = secret[:VISIBLE_PREFIX_CHARS]
    with pool.connection() as conn:  # one transaction: the key and its audit event, or neither
        conn.execute(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash) VALUES (%s, %s, %s, %s, %s)",
            (key.id, tenant_id, name, prefix, hash_secret(secret)),
        )
        _stage_admin_event(conn, "admin.api_key.created", tenant_id, key.id, actor, name=name, prefix=prefix)
    return key, secret


@dataclass(frozen=True, slots=True)
class ApiKeyListing:
    """A key as an administrator sees it: never its secret, only the first characters that tell keys apart."""

    id: UUID
    tenant_id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def list_api_keys(
    pool: ConnectionPool, *, tenant_id: str | None = None, include_revoked: bool = False
) -> list[ApiKeyListing]:
    """The keys, oldest first: of one tenant or of all, live ones only unless `include_revoked`."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, tenant_id, name, prefix, created_at, revoked_at FROM api_keys"
            " WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)"
            " AND (%(all)s OR revoked_at IS NULL) ORDER BY created_at, id",
            {"tenant": tenant_id, "all": include_revoked},
        ).fetchall()
    return [ApiKeyListing(*row) for row in rows]


def revoke_api_key(pool: ConnectionPool, key_id: UUID, *, actor: str = "") -> bool:
    """Revoke a live key (False: no live key has this id), with its audit event `admin.api_key.revoked`."""
    with pool.connection() as conn:
        row = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING tenant_id, name,"
            " prefix",
            (key_id,),
        ).fetchone()
        if row is None:
            return False
        tenant_id, name, prefix = row
        _stage_admin_event(conn, "admin.api_key.revoked", tenant_id, key_id, actor, name=name, prefix=prefix)
        return True


def _stage_admin_event(
    conn: psycopg.Connection[Any], kind: str, tenant_id: str, key_id: UUID, actor: str, *, name: str, prefix: str
) -> None:
    """An administrative action on a key, in the outbox of the transaction that made it: never its secret."""
    payload = {"api_key": {"id": str(key_id), "name": name, "prefix": prefix}, "actor": actor}
    PostgresOutbox(conn).stage([Event(kind, tenant_id, payload, datetime.now(UTC))])


async def find_api_key(pool: AsyncConnectionPool, secret: str) -> ApiKey | None:
    """The live key with this secret (the ingress, on its event loop). Raises `StoreUnavailable`."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
        return None
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, tenant_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
                (hash_secret(secret),),
            )
            row = await cursor.fetchone()
    except psycopg.OperationalError as exc:  # the pool's timeout included
        raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc
    return ApiKey(row[0], row[1]) if row else None


def find_api_keys(pool: ConnectionPool, secrets_: Collection[str]) -> dict[str, ApiKey]:
    """`find_api_key` for a whole group of messages, in one query; unknown and revoked secrets are left out.
    No cache: a revocation holds from the next group on."""
    candidates = {hash_secret(s): s for s in secrets_ if s.startswith(SECRET_PREFIX) and len(s) <= 200}
    if not candidates:
        return {}
    try:
        with pool.connection() as conn:
            rows = conn.execute(
                "SELECT key_hash, id, tenant_id FROM api_keys WHERE key_hash = ANY(%s) AND revoked_at IS NULL",
                (list(candidates),),
            ).fetchall()
    except psycopg.OperationalError as exc:  # the pool's timeout included
        raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc
    return {candidates[digest]: ApiKey(key_id, tenant_id) for digest, key_id, tenant_id in rows}
