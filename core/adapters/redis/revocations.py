"""Revoked API keys, announced to every ingress at once over Redis pub/sub.

PostgreSQL stays the truth: a key is revoked there first, and an ingress trusts a cached key for at most
`api_key_cache_s` anyway. The announcement only ends that grace period early. Announcements sent while a
listener is not subscribed (Redis down, a reconnection) are lost, so each time the listener's subscription is
confirmed, fresh or after redis-py silently reconnected, the ingress forgets every key it cached.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from uuid import UUID

import redis.asyncio
import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError

from core.adapters.redis.client import REDIS_ERRORS, cancel_and_wait, describe, sync_client
from core.adapters.redis.keys import API_KEY_REVOKED_CHANNEL

log = structlog.get_logger(__name__)


def announce_revoked(redis_url: str, key_id: UUID) -> bool:
    """Tell the listening ingress nodes; False when Redis is unavailable (the key then stops working once their
    caches expire)."""
    client = sync_client(redis_url)
    try:
        client.publish(API_KEY_REVOKED_CHANNEL, str(key_id))
    except REDIS_ERRORS as exc:
        log.warning("api_key.revocation_not_announced", key_id=str(key_id), error=describe(exc))
        return False
    finally:
        client.close()
    return True


class RevocationListener:
    """Async, for the ingress: `await start()` once per process, `await close()` at shutdown. All durations
    are in seconds."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        on_revoked: Callable[[UUID], None],  # forget this key
        on_resync: Callable[[], None],  # forget every key: announcements may have been missed
        reconnect_initial_s: float = 0.1,  # first sleep before reconnecting after a failure
        reconnect_max_s: float = 5.0,  # the reconnect sleep doubles up to this
        idle_ping_s: float = 5.0,  # PING after this long without a message; no answer as long again: reconnect
    ) -> None:
        self._client = client
        self._on_revoked = on_revoked
        self._on_resync = on_resync
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._idle_ping_s = idle_ping_s
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set while the subscription is confirmed, for tests and health

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="api-key-revocations")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def _run(self) -> None:
        delay = self._reconnect_initial_s
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(API_KEY_REVOKED_CHANNEL)
                delay = self._reconnect_initial_s
                await self._read(pubsub)
            except Exception as exc:  # the listener must outlive any failure, not only Redis's
                level = log.warning if isinstance(exc, REDIS_ERRORS) else log.exception
                level("revocations.redis_unavailable", error=describe(exc))
            finally:
                self.subscribed.clear()
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_s)

    async def _read(self, pubsub: PubSub) -> None:
        ping_sent = False
        while True:
            message = await pubsub.get_message(timeout=self._idle_ping_s)
            if message is None:
                if ping_sent:
                    raise RedisConnectionError(f"no answer to PING within {self._idle_ping_s} s")
                await pubsub.ping()
                ping_sent = True
                continue
            ping_sent = False
            if message["type"] == "subscribe":
                self._on_resync()
                self.subscribed.set()
                log.info("revocations.listening")
            elif message["type"] == "message":
                self._revoked(message["data"])

    def _revoked(self, data: object) -> None:
        try:
            key_id = UUID(data.decode() if isinstance(data, bytes) else str(data))
        except ValueError:
            log.warning("revocations.bad_message", data=repr(data)[:100])
            return
        self._on_revoked(key_id)
        log.info("api_key.revoked", key_id=str(key_id))
