"""Waiting for an operation to settle: Redis pub/sub wakes the waiter, `check()` gives the answer.

One pub/sub connection per process, subscribed once to one channel (`SETTLED_CHANNEL`) on which every worker
publishes, per committed group, what it settled: its operation ids on a first line, then a JSON object of
operation id to the entry it cached. One reader task hands each entry to the futures waiting for it (a node
that waits for none of the ids does not even parse the object). A lost or late notification costs latency,
never correctness: the cache, then PostgreSQL (the caller's `check()`), still answer. When Redis is
unavailable, or the connection is lost while waiting, `wait` polls `check()` with capped backoff instead, and
the reader task reconnects in the background with backoff.

A waiter registers before its first `check()`, and only while the subscription is confirmed, so a settlement
published between the two cannot be missed. There is no per-operation SUBSCRIBE or UNSUBSCRIBE: a request
costs the ingress no pub/sub command at all, and every node reads each group's one message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from core.adapters.redis.client import REDIS_ERRORS, cancel_and_wait, describe
from core.adapters.redis.keys import SETTLED_CHANNEL

log = structlog.get_logger(__name__)

Document = dict[str, Any]
Check = Callable[[], Awaitable[Document | None]]


class SettlementWaiter:
    """Async, for the ingress: `await start()` once per process, `await close()` at shutdown.

    The client is the caller's (built by `client.async_client`); the waiter takes one connection of its pool.
    All durations are in seconds.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        poll_initial_s: float = 0.05,  # first sleep between two checks when polling
        poll_max_s: float = 0.5,  # the polling sleep doubles up to this
        reconnect_initial_s: float = 0.1,  # first sleep before reconnecting after a failure
        reconnect_max_s: float = 5.0,  # the reconnect sleep doubles up to this
        idle_ping_s: float = 5.0,  # PING an idle connection this often; no answer by the next time = dead
    ) -> None:
        self._client = client
        self._poll_initial_s = poll_initial_s
        self._poll_max_s = poll_max_s
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._idle_ping_s = idle_ping_s
        self._pubsub: PubSub | None = None  # the live, subscribed connection; None while Redis is unavailable
        # Operation id -> its waiters: each gets the announced entry, or None when the connection was lost.
        self._waiters: dict[str, set[asyncio.Future[Document | None]]] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._pubsub is not None

    async def start(self) -> None:
        """Start the reader task and wait for its first connection attempt. Never raises: if Redis is down,
        waits poll until the reader's background reconnection succeeds."""
        if self._reader is not None:
            return
        first_attempt = asyncio.Event()
        self._reader = asyncio.create_task(self._run(first_attempt), name="settlement-waiter")
        await first_attempt.wait()

    async def close(self) -> None:
        """Stop the reader and drop the connection; waits still in progress fall back to polling."""
        reader, self._reader = self._reader, None
        await cancel_and_wait([reader] if reader is not None else [])
        pubsub = self._pubsub
        if pubsub is not None:
            self._lost(pubsub)
            await self._close_quietly(pubsub)

    async def wait(
        self,
        operation_id: str,
        timeout_s: float,
        *,
        check: Check,
        peek: Check | None = None,
        announced: Callable[[Document], Document | None] | None = None,
    ) -> Document | None:
        """The settled operation's document, or None if it is still pending after about `timeout_s` seconds.

        `check()` is the authoritative look (it may read PostgreSQL); `peek()`, when given, a cheaper one that
        may miss (the cached result), used before waiting. `announced(entry)` turns the entry a worker announced
        (what it cached) into the answer, or None to look again. At the timeout, and whenever Redis cannot
        notify, `check()` decides. Exceptions from any of them propagate; Redis failures never do."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        look = peek or check
        waiter = self._register(operation_id)
        try:
            if waiter is not None:
                result = await look()
                if result is not None:
                    return result
                await asyncio.wait({waiter}, timeout=max(0.0, deadline - loop.time()))
                entry = waiter.result() if waiter.done() else None
                if entry is not None:  # notified, with what the worker cached
                    result = announced(entry) if announced is not None else None
                    result = result if result is not None else await look()
                    if result is not None or look is check:
                        return result
                if not waiter.done():  # timed out
                    return await check()
                # else the connection was lost while waiting (or the peek missed): poll for the time left
        finally:
            if waiter is not None:
                self._unregister(operation_id, waiter)
        result = await check()
        return result if result is not None else await self._poll(check, deadline)

    # --- waiting ------------------------------------------------------------------------------------------
    def _register(self, operation_id: str) -> asyncio.Future[Document | None] | None:
        if self._pubsub is None:
            return None
        waiter: asyncio.Future[Document | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(operation_id, set()).add(waiter)
        return waiter

    def _unregister(self, operation_id: str, waiter: asyncio.Future[Document | None]) -> None:
        waiters = self._waiters.get(operation_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[operation_id]

    async def _poll(self, check: Check, deadline: float) -> Document | None:
        loop = asyncio.get_running_loop()
        delay = self._poll_initial_s
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(delay, remaining))
            result = await check()
            if result is not None:
                return result
            delay = min(delay * 2, self._poll_max_s)
        return None

    # --- the connection and its reader --------------------------------------------------------------------
    async def _run(self, first_attempt: asyncio.Event) -> None:
        delay = self._reconnect_initial_s
        while True:
            pubsub = await self._connect()
            first_attempt.set()
            if pubsub is not None:
                delay = self._reconnect_initial_s
                try:
                    await self._read(pubsub)
                except Exception as exc:  # the reader must outlive any failure, not only Redis's
                    self._lost(pubsub, exc, op="read")
                finally:
                    self._lost(pubsub)
                    await self._close_quietly(pubsub)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_s)

    async def _connect(self) -> PubSub | None:
        pubsub = self._client.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
        except REDIS_ERRORS as exc:
            log.warning("waiter.redis_unavailable", op="connect", error=describe(exc))
            await self._close_quietly(pubsub)
            return None
        except asyncio.CancelledError:
            await self._close_quietly(pubsub)
            raise
        try:
            await pubsub.subscribe(SETTLED_CHANNEL)
            confirmed = await pubsub.get_message(timeout=self._idle_ping_s)
            if confirmed is None or confirmed.get("type") != "subscribe":
                raise RedisConnectionError(f"SUBSCRIBE not confirmed: {confirmed!r}")
        except REDIS_ERRORS as exc:
            log.warning("waiter.redis_unavailable", op="subscribe", error=describe(exc))
            await self._close_quietly(pubsub)
            return None
        except asyncio.CancelledError:
            await self._close_quietly(pubsub)
            raise
        assert pubsub.connection is not None
        # redis-py silently reconnects and resubscribes a pub/sub connection that failed, losing whatever was
        # published meanwhile: treat that as a lost connection, so the waiters of that moment poll instead.
        pubsub.connection.register_connect_callback(self._on_reconnect)
        self._pubsub = pubsub
        log.info("waiter.connected")
        return pubsub

    def _on_reconnect(self, connection: AbstractConnection) -> None:
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is connection:
            self._lost(pubsub, RedisConnectionError("pub/sub connection was re-established"), op="reconnect")

    async def _read(self, pubsub: PubSub) -> None:
        ping_sent = False
        while self._pubsub is pubsub:
            message = await pubsub.get_message(timeout=self._idle_ping_s)
            if self._pubsub is not pubsub:
                return
            if message is not None:
                ping_sent = False
                self._dispatch(message)
            elif ping_sent:
                raise RedisConnectionError(f"no answer to PING within {self._idle_ping_s} s")
            else:
                await pubsub.ping()
                ping_sent = True

    def _dispatch(self, message: dict[str, Any]) -> None:
        data = message.get("data")
        if message.get("type") != "message" or not isinstance(data, bytes) or not self._waiters:
            return  # nobody here waits: not even parsed
        ids, newline, entries = data.partition(b"\n")
        if not newline:
            log.warning("waiter.unreadable_announcement", size=len(data))
            return
        if not any(operation_id.decode(errors="replace") in self._waiters for operation_id in ids.split(b",")):
            return  # a group that settled none of this node's waiters (a batch's may be 300 KB): not parsed
        try:
            settled = orjson.loads(entries)
        except orjson.JSONDecodeError:
            log.warning("waiter.unreadable_announcement", size=len(data))
            return
        if not isinstance(settled, dict):
            return
        for operation_id in settled.keys() & self._waiters.keys():
            entry = settled[operation_id]
            for waiter in self._waiters[operation_id]:
                if not waiter.done():
                    waiter.set_result(entry if isinstance(entry, dict) else {})

    def _lost(self, pubsub: PubSub, error: BaseException | None = None, *, op: str = "") -> None:
        """Forget a connection (once): every current waiter is woken to poll instead."""
        if self._pubsub is not pubsub:
            return
        if error is not None:
            log.warning("waiter.redis_unavailable", op=op, error=describe(error))
        self._pubsub = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _close_quietly(self, pubsub: PubSub) -> None:
        if pubsub.connection is not None:
            pubsub.connection.deregister_connect_callback(self._on_reconnect)
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
