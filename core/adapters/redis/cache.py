"""Operation cache: the idempotency-key fast path and settled operation results, written by the workers.

PostgreSQL is the truth; everything here is a hint that may be missing. Reads answer None and writes do nothing
when Redis cannot answer (logged), and a cached entry that does not parse counts as a miss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import redis
import redis.asyncio
import structlog

from core.adapters import json_text
from core.adapters.redis.client import REDIS_ERRORS, describe
from core.adapters.redis.keys import SETTLED_CHANNEL, idempotency_key, result_key
from core.application.ports import Claim, QueuedKeys

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CachedKey:
    operation_id: str
    fingerprint: str  # of the request body first sent with the key, to detect reuse for another request


class OperationCache:
    """Async, for the ingress. The client is the caller's (built by `client.async_client`); `ledger_id` is the
    database's `ledger_instance` id, which namespaces the idempotency keys."""

    def __init__(self, client: redis.asyncio.Redis, *, ledger_id: str) -> None:
        self._client = client
        self._ledger_id = ledger_id

    async def remember_key(self, tenant_id: str, key: str, *, operation_id: str, fingerprint: str, ttl_s: int) -> None:
        """Remember which operation an idempotency key belongs to, for `ttl_s` seconds (overwrites)."""
        await self.remember_keys([(tenant_id, key, operation_id, fingerprint)], ttl_s=ttl_s)

    async def remember_keys(self, keys: Sequence[tuple[str, str, str, str]], *, ttl_s: int) -> None:
        """`remember_key` for many (tenant, key, operation id, fingerprint), in one round trip."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant_id, key, operation_id, fingerprint in keys:
                    value = json.dumps(
                        {"operation_id": operation_id, "fingerprint": fingerprint}, separators=(",", ":")
                    )
                    pipe.set(idempotency_key(self._ledger_id, tenant_id, key), value, ex=ttl_s)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("cache.redis_unavailable", op="remember_key", keys=len(keys), error=describe(exc))

    async def lookup_key(self, tenant_id: str, key: str) -> CachedKey | None:
        raw = await self._get(idempotency_key(self._ledger_id, tenant_id, key), op="lookup_key")
        if raw is None:
            return None
        doc = _parse_object(raw)
        if doc is None or not isinstance(doc.get("operation_id"), str) or not isinstance(doc.get("fingerprint"), str):
            log.warning("cache.corrupt_entry", op="lookup_key", tenant_id=tenant_id)
            return None
        return CachedKey(operation_id=doc["operation_id"], fingerprint=doc["fingerprint"])

    async def get_result(self, operation_id: str) -> dict[str, Any] | None:
        """The settled operation's document as stored by `SettlementPublisher.settled`, or None."""
        raw = await self._get(result_key(operation_id), op="get_result")
        if raw is None:
            return None
        doc = _parse_object(raw)
        if doc is None:
            log.warning("cache.corrupt_entry", op="get_result", operation_id=operation_id)
        return doc

    async def _get(self, name: str, *, op: str) -> bytes | None:
        try:
            raw = await self._client.get(name)
        except REDIS_ERRORS as exc:
            log.warning("cache.redis_unavailable", op=op, error=describe(exc))
            return None
        return raw if isinstance(raw, bytes) else None


class RedisQueuedKeys(QueuedKeys):
    """The keys whose command RabbitMQ confirmed, in the idempotency-key cache, kept `ttl_s` seconds."""

    def __init__(self, cache: OperationCache, *, ttl_s: int) -> None:
        self.cache = cache
        self.ttl_s = ttl_s

    async def remember(self, claims: Sequence[Claim]) -> None:
        await self.cache.remember_keys(
            [(c.tenant_id, c.key, str(c.operation_id), c.fingerprint) for c in claims], ttl_s=self.ttl_s
        )

    async def queued_operation(self, tenant_id: str, key: str) -> UUID | None:
        cached = await self.cache.lookup_key(tenant_id, key)
        try:
            return UUID(cached.operation_id) if cached is not None else None
        except ValueError:
            return None


class SettlementPublisher:
    """Sync, for the workers: after an operation settled in PostgreSQL, cache its result and wake the waiters."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def settled(self, operation_id: str, document: dict[str, Any], *, ttl_s: int) -> None:
        """SET the result (TTL `ttl_s` seconds) and PUBLISH the id, in one MULTI/EXEC round trip."""
        self.settled_many([(operation_id, document)], ttl_s=ttl_s)

    def settled_many(self, settled: Sequence[tuple[str, dict[str, Any]]], *, ttl_s: int) -> None:
        """`settled` for a whole group of (operation id, document), in one round trip."""
        payloads: list[tuple[str, str]] = []
        for operation_id, document in settled:
            try:
                payloads.append((operation_id, json_text.dumps(document)))
            except (TypeError, ValueError) as exc:
                log.error("settlement.unserializable", operation_id=operation_id, error=describe(exc))
        if not payloads:
            return
        try:
            with self._client.pipeline(transaction=True) as pipe:
                for operation_id, payload in payloads:
                    pipe.set(result_key(operation_id), payload, ex=ttl_s)
                # Cached first, announced after (MULTI/EXEC keeps the order), the entries in the announcement
                # too (JSON already, joined as one object): a waiter needs no read of its own. The ids come first,
                # on a line of their own: a node looks there for its waiters, not through a batch's 300 KB.
                ids = ",".join(op for op, _ in payloads)
                entries = ",".join(f"{json.dumps(op)}:{payload}" for op, payload in payloads)
                announcement = f"{ids}\n{{{entries}}}"
                pipe.publish(SETTLED_CHANNEL, announcement)
                pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("settlement.redis_unavailable", operations=len(settled), error=describe(exc))


def _parse_object(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        return None
    return doc if isinstance(doc, dict) else None
