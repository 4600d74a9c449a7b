"""Queues read in groups (pika, blocking: one process, one consumer): the command queues for group commit,
and a queue of ledger events for the audit store.

Two queues feed the same groups: the ingress's command queue (Dramatiq's message format) and the queue of
direct AMQP producers (`requests.py`), bound to the `ledger.requests` exchange by command type. Delivery tags
are the channel's, so one multiple-ack covers both.

RabbitMQ hands the consumer up to `prefetch` unacknowledged messages. `next_group` waits for one, then up to
`group_wait_s` for more, and returns at most `group_max`. Once the group is settled and committed, the worker
acknowledges all of it with one multiple-ack; a worker that dies before that leaves every message of the
group to be redelivered, and settling replays what was committed. Only the rare message that needs it is
rejected to the dead-letter queue or sent back for a later try, each on its own.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import pika
import pika.channel
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from core.adapters.rabbitmq.commands import (
    COMMANDS_HEADER,
    DEAD_LETTER_TTL_MS,
    ReplyTo,
    dead_letter_queue,
    main_queue_arguments,
    retry_queue,
)
from core.adapters.rabbitmq.connection import connection_parameters
from core.adapters.rabbitmq.events import declare_subscriber_queue
from core.adapters.rabbitmq.requests import AUTHORIZATION_HEADER

# Longest wait for a broker that blocks publishers while a retry is sent back, in seconds.
BLOCKED_TIMEOUT_S = 30.0


class ConsumerCancelled(pika.exceptions.AMQPError):  # type: ignore[misc]  # pika is untyped
    """RabbitMQ cancelled our consumer (its queue was deleted): open again, which declares the queues anew."""


@dataclass(frozen=True, slots=True)
class Delivery:
    tag: int
    body: bytes
    redelivered: bool
    from_client: bool  # published by a direct AMQP producer, not by the ingress or a retry
    routing_key: str
    properties: pika.spec.BasicProperties

    @property
    def commands(self) -> int:
        """How many commands the message carries, as its batch header says (1 without one)."""
        count = (self.properties.headers or {}).get(COMMANDS_HEADER, 1)
        return count if type(count) is int and count > 0 else 1


class GroupConsumer(abc.ABC):
    """One blocking connection and one channel (publisher confirms on), read in groups: subclasses declare
    their queues and start consuming them in `declare`."""

    def __init__(self, amqp_url: str, *, group_max: int, group_wait_s: float, prefetch: int) -> None:
        self.group_max = group_max
        self.group_wait_s = group_wait_s
        self.prefetch = prefetch
        self._parameters = connection_parameters(amqp_url, blocked_timeout=BLOCKED_TIMEOUT_S)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._received: deque[Delivery] = deque()
        self._received_commands = 0  # the commands those deliveries carry
        self._cancelled = False

    @abc.abstractmethod
    def declare(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        """Declare the queues (and what they are bound to), then `consume` them."""

    def consume(self, channel: BlockingChannel, queue: str, *, from_client: bool = False) -> None:
        """Start consuming `queue` into the groups."""

        def on_message(
            channel: BlockingChannel,
            method: pika.spec.Basic.Deliver,
            properties: pika.spec.BasicProperties,
            body: bytes,
        ) -> None:
            delivery = Delivery(
                method.delivery_tag, body, bool(method.redelivered), from_client, method.routing_key, properties
            )
            self._received.append(delivery)
            self._received_commands += delivery.commands

        channel.basic_consume(queue, on_message)

    def open(self) -> None:
        """Connect, declare the queues and start consuming."""
        self.close()
        self._received.clear()  # their tags died with the old channel; RabbitMQ redelivers them
        self._received_commands = 0
        self._cancelled = False
        connection = self._connection = pika.BlockingConnection(self._parameters)
        channel = self._channel = connection.channel()
        channel.confirm_delivery()  # what is sent on (a retry, a dead letter) is taken before its original is acked
        channel.add_on_cancel_callback(self._on_cancel)
        channel.basic_qos(prefetch_count=self.prefetch)
        self.declare(connection, channel)

    @property
    def is_open(self) -> bool:
        return self._connection is not None and self._connection.is_open

    def _on_cancel(self, method: object) -> None:
        self._cancelled = True

    def next_group(self, *, timeout_s: float) -> list[Delivery]:
        """Wait up to `timeout_s` for a first message, then up to `group_wait_s` for more; at most `group_max`
        commands (a batch message counts its commands, and is never split; one larger than that comes alone),
        in delivery order. Empty when nothing came."""
        connection = self._require_connection()
        deadline = time.monotonic() + timeout_s
        while not self._received and (remaining := deadline - time.monotonic()) > 0:
            connection.process_data_events(time_limit=remaining)
            if self._cancelled:
                raise ConsumerCancelled("RabbitMQ cancelled the consumer")
        if not self._received:
            return []
        deadline = time.monotonic() + self.group_wait_s
        while self._commands_waiting() < self.group_max and (remaining := deadline - time.monotonic()) > 0:
            connection.process_data_events(time_limit=remaining)
        group: list[Delivery] = []
        commands = 0
        while self._received and (not group or commands + self._received[0].commands <= self.group_max):
            delivery = self._received.popleft()
            group.append(delivery)
            commands += delivery.commands
        self._received_commands -= commands
        return group

    def _commands_waiting(self) -> int:
        return self._received_commands

    def dead_letter(self, tag: int) -> None:
        """Reject one message for good: RabbitMQ moves it to the dead-letter queue."""
        self._require_channel().basic_nack(tag, multiple=False, requeue=False)

    def ack_through(self, tag: int) -> None:
        """Acknowledge every message delivered up to `tag` that is neither acknowledged nor rejected yet."""
        self._require_channel().basic_ack(tag, multiple=True)

    def sleep(self, seconds: float) -> None:
        """Wait while the connection keeps its heartbeats (messages that arrive meanwhile are buffered)."""
        if self.is_open:
            self._require_connection().sleep(seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            # Already gone or not: unacknowledged messages go back to the queue either way.
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()

    def _require_connection(self) -> pika.BlockingConnection:
        if self._connection is None:
            raise pika.exceptions.ConnectionWrongStateError("the consumer is not open")
        return self._connection

    def _require_channel(self) -> BlockingChannel:
        if self._channel is None:
            raise pika.exceptions.ConnectionWrongStateError("the consumer is not open")
        return self._channel


class CommandConsumer(GroupConsumer):
    """The command queue (Dramatiq's main and dead-letter queues, one retry queue per delay) and the queue of
    direct AMQP producers, bound to the request exchange by command type."""

    def __init__(
        self,
        amqp_url: str,
        *,
        queue_name: str,
        retry_delays_ms: Sequence[int],
        request_exchange: str,
        request_queue: str,
        request_types: Sequence[str],
        group_max: int,
        group_wait_s: float,
        prefetch: int,
    ) -> None:
        super().__init__(amqp_url, group_max=group_max, group_wait_s=group_wait_s, prefetch=prefetch)
        self.queue_name = queue_name
        self.retry_delays_ms = list(retry_delays_ms)
        self.request_exchange = request_exchange
        self.request_queue = request_queue
        self.request_types = list(request_types)
        self._replies: BlockingChannel | None = None  # no confirms: a reply is a courtesy, the result is stored

    def declare(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        channel.queue_declare(self.queue_name, durable=True, arguments=main_queue_arguments(self.queue_name))
        channel.queue_declare(
            dead_letter_queue(self.queue_name), durable=True, arguments={"x-message-ttl": DEAD_LETTER_TTL_MS}
        )
        for delay_ms in sorted(set(self.retry_delays_ms)):
            channel.queue_declare(
                retry_queue(self.queue_name, delay_ms),
                durable=True,
                arguments={
                    "x-message-ttl": delay_ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue_name,
                },
            )
        channel.exchange_declare(self.request_exchange, exchange_type="direct", durable=True)
        channel.queue_declare(self.request_queue, durable=True)
        channel.queue_declare(
            dead_letter_queue(self.request_queue), durable=True, arguments={"x-message-ttl": DEAD_LETTER_TTL_MS}
        )
        for command_type in self.request_types:
            channel.queue_bind(self.request_queue, self.request_exchange, routing_key=command_type)
        self.consume(channel, self.queue_name)
        self.consume(channel, self.request_queue, from_client=True)
        self._replies = connection.channel()

    def retry_later(self, body: bytes, *, attempt: int) -> None:
        """Send a message back for its `attempt`-th retry (1-based), after that retry's delay; confirmed."""
        delay_ms = self.retry_delays_ms[min(attempt, len(self.retry_delays_ms)) - 1]
        self._require_channel().basic_publish(
            "",
            retry_queue(self.queue_name, delay_ms),
            body,
            pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"),
            mandatory=True,
        )

    def reply(self, reply: ReplyTo, body: bytes, *, problem: bool) -> None:
        """Answer a direct AMQP producer on its reply queue (dropped by RabbitMQ if that queue is gone)."""
        if self._replies is None:
            raise pika.exceptions.ConnectionWrongStateError("the consumer is not open")
        content_type = "application/problem+json" if problem else "application/json"
        properties = pika.BasicProperties(content_type=content_type, correlation_id=reply.correlation_id)
        self._replies.basic_publish("", reply.queue, body, properties)

    def dead_letter_copy(self, body: bytes) -> None:
        """Keep one command of a batch message in the dead-letter queue (the batch itself is acknowledged, since
        its other commands settled); confirmed."""
        self._require_channel().basic_publish(
            "",
            dead_letter_queue(self.queue_name),
            body,
            pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"),
            mandatory=True,
        )

    def refuse_request(self, delivery: Delivery, *, code: str, reason: str) -> None:
        """Keep a refused client message in `<request queue>.XQ` with why, minus its secret; confirmed (the
        original is then acknowledged with its group). Nothing a client sends is dropped silently."""
        properties = delivery.properties
        headers = {k: v for k, v in (properties.headers or {}).items() if k.lower() != AUTHORIZATION_HEADER}
        headers.update(
            {"x-refused-code": code, "x-refused-reason": reason[:1000], "x-routing-key": delivery.routing_key}
        )
        kept = pika.BasicProperties(
            content_type=properties.content_type,
            message_id=properties.message_id if isinstance(properties.message_id, str) else None,
            correlation_id=properties.correlation_id if isinstance(properties.correlation_id, str) else None,
            reply_to=properties.reply_to if isinstance(properties.reply_to, str) else None,
            headers=headers,
            delivery_mode=pika.DeliveryMode.Persistent,
        )
        self._require_channel().basic_publish(
            "", dead_letter_queue(self.request_queue), delivery.body, kept, mandatory=True
        )


class EventConsumer(GroupConsumer):
    """A durable queue of its own bound to the events exchange (all event types), with a dead-letter queue."""

    def __init__(
        self, amqp_url: str, *, exchange: str, queue_name: str, group_max: int, group_wait_s: float, prefetch: int
    ) -> None:
        super().__init__(amqp_url, group_max=group_max, group_wait_s=group_wait_s, prefetch=prefetch)
        self.exchange = exchange
        self.queue_name = queue_name

    def declare(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        declare_subscriber_queue(channel, self.queue_name, self.exchange)
        self.consume(channel, self.queue_name)
