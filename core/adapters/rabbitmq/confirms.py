"""Publishing on asyncio with pipelined publisher confirms (pika's asyncio adapter).

One connection and one confirming channel are shared by every caller in the process. Each `publish` sends its
message at once and awaits only its own confirm, so a thousand concurrent publishes cost one round trip of
latency each, not a thousand in a row: the broker acknowledges them in batches (`multiple=True`), and one
ack frame wakes every caller it covers.

Messages are published `mandatory` unless the caller says otherwise: one no queue takes comes back as
`basic.return` before its ack, and its caller gets `PublishFailed` instead of a confirm for a message the
broker dropped.

The connection opens on first use and again after it was lost. While it is down, or when the broker blocks
publishers (memory or disk alarm), a publish fails within its timeout: the caller answers 503 rather than hold
a request. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pika
import structlog
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.frame import Method

from core.adapters.rabbitmq.connection import connection_parameters

log = structlog.get_logger(__name__)

# Longest a publish waits for its confirm, or a connection for its handshake, in seconds.
PUBLISH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


class PublishFailed(Exception):
    """The broker did not take the message: unreachable, closed on us, nacked, returned it, or timed out."""


# One step of the topology declared on every (re)connect, before the first publish on it: it calls a channel
# method with `done` as its completion callback.
Declaration = Callable[[Channel, Callable[[Any], None]], None]


def durable_queue(name: str, arguments: dict[str, Any] | None = None) -> Declaration:
    return lambda channel, done: channel.queue_declare(name, durable=True, arguments=arguments, callback=done)


def durable_exchange(name: str, kind: str) -> Declaration:
    return lambda channel, done: channel.exchange_declare(name, exchange_type=kind, durable=True, callback=done)


def binding(queue: str, exchange: str, routing_key: str) -> Declaration:
    return lambda channel, done: channel.queue_bind(queue, exchange, routing_key=routing_key, callback=done)


class ConfirmingPublisher:
    """A shared, pipelined, confirming AMQP publisher for one event loop.

    amqp_url: the broker; connection bounds come from `connection_parameters`.
    topology: declared in order on every connect, before the first publish on it.
    timeout_s: seconds a publish waits for its confirm (connecting included).
    connect_timeout_s: seconds the TCP and AMQP handshake may take.
    name: the connection's name as RabbitMQ shows it (management UI, `rabbitmqctl list_connections`).
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        topology: Sequence[Declaration] = (),
        timeout_s: float = PUBLISH_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        name: str = "cleanledger",
    ) -> None:
        self.parameters = connection_parameters(amqp_url, connect_timeout=connect_timeout_s, blocked_timeout=timeout_s)
        self.parameters.client_properties = {"connection_name": name}  # how `rabbitmqctl list_connections` names it
        self.topology = tuple(topology)
        self.timeout_s = timeout_s
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._opening: asyncio.Future[Channel] | None = None
        self._tags = itertools.count(1)
        self._pending: dict[int, asyncio.Future[None]] = {}  # delivery tag -> its caller's confirm
        self._by_message_id: dict[str, int] = {}  # for `basic.return`, which names no delivery tag
        self._closing = False

    @property
    def connected(self) -> bool:
        connection, channel = self._connection, self._channel
        return connection is not None and connection.is_open and channel is not None and channel.is_open

    async def publish(
        self,
        *,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        mandatory: bool = True,
    ) -> None:
        """Send one message and wait for the broker to confirm it. Raises `PublishFailed`, also when the message
        is `mandatory` and no queue took it."""
        try:
            async with asyncio.timeout(self.timeout_s):
                channel = await self._open_channel()
                tag = next(self._tags)
                confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._pending[tag] = confirmed
                if properties.message_id:
                    self._by_message_id[properties.message_id] = tag
                try:
                    channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
                    await confirmed
                finally:
                    self._pending.pop(tag, None)
                    if properties.message_id:
                        self._by_message_id.pop(properties.message_id, None)
        except TimeoutError:
            # A peer gone silent (no FIN, heartbeats not due yet) looks just like this: start afresh next time.
            self._abandon(PublishFailed("a publish timed out on this connection"))
            raise PublishFailed(f"no confirm from RabbitMQ within {self.timeout_s:g} s") from None
        except PublishFailed:
            raise
        except Exception as exc:  # pika's channel/connection errors: the broker did not take it
            self._abandon(PublishFailed(f"the connection broke: {exc!r}"))
            raise PublishFailed(str(exc) or type(exc).__name__) from exc

    async def connect(self) -> None:
        """Open the connection now (it otherwise opens on first publish). Raises `PublishFailed`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._open_channel()
        except TimeoutError:
            raise PublishFailed("RabbitMQ did not answer in time") from None

    async def close(self) -> None:
        self._closing = True
        connection = self._connection
        if connection is not None and connection.is_open:
            closed = asyncio.get_running_loop().create_future()

            def on_closed(*_: object) -> None:
                if not closed.done():
                    closed.set_result(None)

            connection.add_on_close_callback(on_closed)
            connection.close()
            try:
                async with asyncio.timeout(2):
                    await closed
            except TimeoutError:
                pass
        self._fail_all(PublishFailed("the publisher was closed"))

    # -- the connection -------------------------------------------------------------------------------

    async def _open_channel(self) -> Channel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._closing:
            raise PublishFailed("the publisher is closed")
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_future()
            self._start_connection(self._opening)
        return await asyncio.shield(self._opening)

    def _start_connection(self, opened: asyncio.Future[Channel]) -> None:
        loop = asyncio.get_running_loop()

        def fail(error: BaseException) -> None:
            if not opened.done():
                opened.set_exception(PublishFailed(f"RabbitMQ unreachable: {error or type(error).__name__}"))
                opened.exception()  # retrieved: a failed connect with no caller left must not log noise

        def on_open(connection: Any) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_channel(channel: Channel) -> None:
            channel.add_on_close_callback(self._on_channel_closed)
            channel.add_on_return_callback(self._on_return)
            channel.confirm_delivery(
                lambda frame: self._on_confirm(channel, frame), callback=lambda _: declare(channel, list(self.topology))
            )

        def declare(channel: Channel, steps: list[Declaration]) -> None:
            if not channel.is_open:  # closed while declaring (a declaration the broker refused): give up
                fail(PublishFailed("the channel closed while declaring the topology"))
                return
            if not steps:
                self._tags = itertools.count(1)  # delivery tags restart on every channel
                self._channel = channel
                if not opened.done():
                    opened.set_result(channel)
                return
            steps[0](channel, lambda _: declare(channel, steps[1:]))

        def on_close(connection: Any, error: BaseException) -> None:
            self._on_connection_closed(connection, error)
            fail(error)

        self._connection = AsyncioConnection(
            self.parameters,
            on_open_callback=on_open,
            on_open_error_callback=lambda _, error: fail(error),
            on_close_callback=on_close,
            custom_ioloop=loop,
        )

    def _abandon(self, error: PublishFailed) -> None:
        """Drop the connection in hand (its other publishes fail with `error`); the next publish opens anew."""
        connection, self._connection, self._channel = self._connection, None, None
        self._fail_all(error)
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):  # already broken: nothing left to release
                connection.close()

    def _on_connection_closed(self, connection: Any, error: BaseException) -> None:
        if connection is not self._connection:  # one abandoned earlier: its publishes were failed then
            return
        self._connection = None
        self._channel = None
        if not self._closing:
            log.warning("amqp.publisher_disconnected", error=str(error))
        self._fail_all(PublishFailed(f"the RabbitMQ connection closed: {error}"))

    def _on_channel_closed(self, channel: Channel, error: BaseException) -> None:
        if channel is self._channel:
            self._channel = None
            self._fail_all(PublishFailed(f"the RabbitMQ channel closed: {error}"))
            if self._connection is not None and self._connection.is_open:
                self._connection.close()  # a fresh connection and channel on the next publish

    # -- confirms -------------------------------------------------------------------------------------

    def _on_confirm(self, channel: Channel, frame: Method[Any]) -> None:
        if channel is not self._channel:  # a late confirm of an abandoned channel: its tags are not ours
            return
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            waiter = self._pending.pop(tag, None)
            if waiter is None or waiter.done():
                continue
            if acked:
                waiter.set_result(None)
            else:
                waiter.set_exception(PublishFailed("RabbitMQ refused the message (nack)"))

    def _on_return(self, channel: Channel, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        if channel is not self._channel:
            return
        tag = self._by_message_id.get(properties.message_id or "")
        waiter = self._pending.get(tag) if tag is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_exception(PublishFailed(f"no queue took the message: {method.reply_text}"))

    def _fail_all(self, error: PublishFailed) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(error)
