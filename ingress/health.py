"""Readiness of one ingress node (`GET /readyz`): can it accept a write right now?

A write needs PostgreSQL (the operation is recorded there) and RabbitMQ (its command is published there), so
either one unreachable makes the node not ready. Redis only speeds things up, so Redis down is reported as
`degraded` and the node stays ready. Each check is cheap and bounded by CHECK_TIMEOUT_S; none blocks the event
loop (PostgreSQL is asked over an asyncio connection, RabbitMQ on a thread of its own, Redis with the node's
asyncio client). The checks use connections of their own, not the request pools: a node busy with requests
is still ready, and a check never waits behind them. A result is reused for CACHE_S, and concurrent probes
share one round of checks, so probing often costs the services nothing much.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pika
import psycopg
import redis.asyncio
import structlog

from core.adapters.rabbitmq.connection import connection_parameters
from core.settings import Settings

log = structlog.get_logger("ingress")
CHECK_TIMEOUT_S = 1.0  # seconds a dependency has to answer before it counts as unreachable
CACHE_S = 1.0  # seconds a readiness result is reused

State = Literal["ok", "unreachable", "degraded"]


class Readiness:
    """The node's view of its dependencies. `close()` at shutdown (its thread)."""

    def __init__(self, settings: Settings, redis_client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.redis = redis_client
        # One thread: pika blocks, and one RabbitMQ check at a time is plenty (results are shared).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readiness")
        self._last: tuple[float, dict[str, State]] | None = None
        self._round: asyncio.Task[dict[str, State]] | None = None

    async def check(self) -> dict[str, State]:
        """{"postgres": ..., "rabbitmq": ..., "redis": ...}, at most CACHE_S old."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < CACHE_S:
            return self._last[1]
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._check_all())
        # shield: one probe giving up (client gone) must not cancel the round the others wait on
        return await asyncio.shield(self._round)

    async def _check_all(self) -> dict[str, State]:
        postgres, rabbitmq, redis_ok = await asyncio.gather(
            self._bounded("postgres", self._postgres()),
            self._bounded("rabbitmq", asyncio.get_running_loop().run_in_executor(self.executor, self._rabbitmq)),
            self._bounded("redis", self._redis()),
        )
        states: dict[str, State] = {
            "postgres": "ok" if postgres else "unreachable",
            "rabbitmq": "ok" if rabbitmq else "unreachable",
            "redis": "ok" if redis_ok else "degraded",
        }
        self._last = (time.monotonic(), states)
        return states

    async def _bounded(self, name: str, probe: Awaitable[None]) -> bool:
        try:
            await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
        except Exception as exc:  # timeouts, refusals, auth or protocol errors alike: a probe always answers
            log.warning("readiness.check_failed", dependency=name, error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    async def _postgres(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.settings.database_url,
            connect_timeout=max(1, int(CHECK_TIMEOUT_S)),
            autocommit=True,
            application_name="cleanledger-readiness",
        )
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()

    def _rabbitmq(self) -> None:
        """Open and close an AMQP connection (handshake and login): the broker takes connections."""
        params = connection_parameters(
            self.settings.amqp_url, connect_timeout=CHECK_TIMEOUT_S, blocked_timeout=CHECK_TIMEOUT_S
        )
        connection = pika.BlockingConnection(params)
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            connection.close()

    async def _redis(self) -> None:
        await self.redis.ping()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
