"""Waiting for an operation to settle: Redis pub/sub wakes the waiter, `check()` gives the answer.

One pub/sub connection per process, read by one task that dispatches notifications to the waiting futures.
A notification is only a hint to look now: the answer always comes from the caller's `check()` (the cached
result, or PostgreSQL), so a lost or late notification costs latency, never correctness. When Redis is
unavailable, or the connection is lost while waiting, `wait` polls `check()` with capped backoff instead, and
the reader task reconnects in the background with backoff.

Subscribing happens before the first `check()` and only counts once Redis confirmed it, so a settlement
published between the two cannot be missed. All pub/sub commands run in tasks of their own, serialised by a
lock, so a cancelled waiter can never leave a command half-sent or the subscription state inconsistent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from core.adapters.redis.client import REDIS_ERRORS, cancel_and_wait, describe
from core.adapters.redis.keys import settled_channel

log = structlog.get_logger(__name__)

Document = dict[str, Any]
Check = Callable[[], Awaitable[Document | None]]


@dataclass(eq=False)
class _Channel:
    """The waiters of one operation on the current connection."""

    ready: asyncio.Future[bool]  # True once Redis confirmed the SUBSCRIBE, False if the connection was lost
    waiters: set[asyncio.Future[bool]] = field(default_factory=set)  # True = notified, False = connection lost


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
        subscribe_timeout_s: float = 1.0,  # longest wait for Redis to confirm a SUBSCRIBE before polling instead
    ) -> None:
        self._client = client
        self._poll_initial_s = poll_initial_s
        self._poll_max_s = poll_max_s
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._idle_ping_s = idle_ping_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._pubsub: PubSub | None = None  # the live connection; None while Redis is unavailable
        self._channels: dict[str, _Channel] = {}
        self._acks: dict[str, deque[asyncio.Future[bool]]] = {}  # SUBSCRIBE replies still due, in order
        self._commands = asyncio.Lock()  # one pub/sub command at a time, in the order they were asked for
        self._tasks: set[asyncio.Task[None]] = set()
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
        tasks = [t for t in (self._reader, *self._tasks) if t is not None]
        self._reader = None
        await cancel_and_wait(tasks)
        pubsub = self._pubsub
        if pubsub is not None:
            self._lost(pubsub)
            await self._close_quietly(pubsub)

    async def wait(self, operation_id: str, timeout_s: float, *, check: Check) -> Document | None:
        """The settled operation's document as given by `check()`, or None if it is still pending after about
        `timeout_s` seconds. Exceptions from `check()` propagate; Redis failures never do."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        channel = settled_channel(operation_id)
        joined = self._join(channel)
        try:
            if joined is not None and not await self._subscribed(joined[0], deadline):
                self._leave(channel, *joined)
                joined = None
            result = await check()
            if result is not None:
                return result
            if joined is not None:
                waiter = joined[1]
                await asyncio.wait({waiter}, timeout=max(0.0, deadline - loop.time()))
                if not waiter.done() or waiter.result():  # timed out, or notified: look once more
                    return await check()
                # else the connection was lost while waiting: poll for the time left
        finally:
            if joined is not None:
                self._leave(channel, *joined)
        return await self._poll(check, deadline)

    # --- waiting ------------------------------------------------------------------------------------------
    def _join(self, channel: str) -> tuple[_Channel, asyncio.Future[bool]] | None:
        pubsub = self._pubsub
        if pubsub is None:
            return None
        loop = asyncio.get_running_loop()
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel(ready=loop.create_future())
            self._spawn(self._subscribe(pubsub, channel, entry))
        waiter: asyncio.Future[bool] = loop.create_future()
        entry.waiters.add(waiter)
        return entry, waiter

    async def _subscribed(self, entry: _Channel, deadline: float) -> bool:
        remaining = deadline - asyncio.get_running_loop().time()
        await asyncio.wait({entry.ready}, timeout=max(0.0, min(self._subscribe_timeout_s, remaining)))
        return entry.ready.done() and entry.ready.result()

    def _leave(self, channel: str, entry: _Channel, waiter: asyncio.Future[bool]) -> None:
        """Synchronous, so a cancelled waiter always leaves; the UNSUBSCRIBE itself runs in a task."""
        entry.waiters.discard(waiter)
        pubsub = self._pubsub
        if entry.waiters or self._channels.get(channel) is not entry or pubsub is None:
            return
        del self._channels[channel]
        self._spawn(self._unsubscribe(pubsub, channel))

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

    # --- pub/sub commands ---------------------------------------------------------------------------------
    def _spawn(self, command: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(command)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _subscribe(self, pubsub: PubSub, channel: str, entry: _Channel) -> None:
        async with self._commands:
            if self._pubsub is not pubsub or self._channels.get(channel) is not entry:
                return  # the connection was lost, or every waiter already left
            self._acks.setdefault(channel, deque()).append(entry.ready)
            try:
                await pubsub.subscribe(channel)
                return
            except Exception as exc:  # Redis errors, or the connection closed under us by the reader
                self._lost(pubsub, exc, op="subscribe")
        await self._close_quietly(pubsub)

    async def _unsubscribe(self, pubsub: PubSub, channel: str) -> None:
        async with self._commands:
            if self._pubsub is not pubsub or channel in self._channels:
                return  # the connection was lost, or a new waiter came (its SUBSCRIBE is queued behind us)
            try:
                await pubsub.unsubscribe(channel)
                return
            except Exception as exc:
                self._lost(pubsub, exc, op="unsubscribe")
        await self._close_quietly(pubsub)

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
                async with self._commands:
                    if self._pubsub is pubsub:
                        await pubsub.ping()
                ping_sent = True

    def _dispatch(self, message: dict[str, Any]) -> None:
        raw = message.get("channel")
        channel = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        kind = message.get("type")
        if kind == "message":
            entry = self._channels.get(channel)
            for waiter in entry.waiters if entry is not None else ():
                if not waiter.done():
                    waiter.set_result(True)
        elif kind == "subscribe":
            acks = self._acks.get(channel)
            if acks:
                ack = acks.popleft()
                if not acks:
                    del self._acks[channel]
                if not ack.done():
                    ack.set_result(True)

    def _lost(self, pubsub: PubSub, error: BaseException | None = None, *, op: str = "") -> None:
        """Forget a connection (once): every current waiter is woken to poll instead."""
        if self._pubsub is not pubsub:
            return
        if error is not None:
            log.warning("waiter.redis_unavailable", op=op, error=describe(error))
        self._pubsub = None
        channels, self._channels = self._channels, {}
        acks, self._acks = self._acks, {}
        futures = [f for q in acks.values() for f in q] + [f for c in channels.values() for f in c.waiters]
        for future in futures:
            if not future.done():
                future.set_result(False)

    async def _close_quietly(self, pubsub: PubSub) -> None:
        if pubsub.connection is not None:
            pubsub.connection.deregister_connect_callback(self._on_reconnect)
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
