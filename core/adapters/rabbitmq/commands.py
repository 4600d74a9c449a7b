"""Commands onto RabbitMQ, in Dramatiq's message format (the queue, its arguments and its dead-letter queue
are Dramatiq's too), and read back by the group-commit consumer (`consumer.py`).

Two publishers, both with publisher confirms (a publish returns only once RabbitMQ has taken responsibility
for the persistent message): `AmqpCommandQueue` for the asyncio ingress, every request's confirm pipelined
on one shared channel; and the blocking `CommandPublisher` (pika under Dramatiq's broker) for the
redelivery sweeper and tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from core.adapters.rabbitmq.confirms import ConfirmingPublisher, PublishFailed, durable_queue
from core.adapters.rabbitmq.connection import bounded_url
from core.application.commands import Command, command_from_json, validate_idempotency_key
from core.application.ports import CommandQueue, QueueUnavailable
from core.domain.errors import ValidationFailed

# The actor name command messages carry (Dramatiq's message format; workers/consumer.py reads them).
EXECUTE_ACTOR = "execute_command"
# Dramatiq's: dead letters are kept this long, in milliseconds (7 days), then dropped by RabbitMQ.
DEAD_LETTER_TTL_MS = 7 * 24 * 3600 * 1000
# Bounds of one publish from an HTTP request, in seconds: connecting, and waiting out a blocked broker.
CONNECT_TIMEOUT_S = 2.0
BLOCKED_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a direct AMQP producer wants the settled result: a queue, and its correlation id."""

    queue: str
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class QueuedCommand:
    """A command message as a worker reads it."""

    operation_id: UUID
    idempotency_key: str
    command: Command
    retries: int  # times it was already sent back for a later try
    reply: ReplyTo | None  # a direct AMQP producer's, carried along through retries


def parse_command_message(body: bytes) -> tuple[dict[str, Any], QueuedCommand]:
    """The message's JSON document and the command it carries; `ValidationFailed` when it is not one."""
    try:
        document = json.loads(body)
        kwargs = document["kwargs"]
        options = document.get("options", {})
        retries = options.get("retries", 0)
        if type(retries) is not int or retries < 0:
            raise ValueError("options.retries must be a non-negative integer")
        reply_to, correlation_id = options.get("reply_to"), options.get("correlation_id")
        queued = QueuedCommand(
            UUID(kwargs["operation_id"]),
            validate_idempotency_key(kwargs["idempotency_key"]),
            command_from_json(kwargs["command"]),
            retries,
            ReplyTo(str(reply_to), None if correlation_id is None else str(correlation_id)) if reply_to else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValidationFailed(f"not a command message: {exc}") from None
    return document, queued


def retry_message(document: dict[str, Any]) -> bytes:
    """The same message, counted as retried once more."""
    options = dict(document.get("options", {}))
    options["retries"] = options.get("retries", 0) + 1
    return json.dumps({**document, "options": options}, separators=(",", ":")).encode()


def main_queue_arguments(queue_name: str) -> dict[str, Any]:
    """Dramatiq's arguments for a queue: a message rejected without requeue moves to `<queue>.XQ`."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_queue(queue_name)}


def dead_letter_queue(queue_name: str) -> str:
    return f"{queue_name}.XQ"


def retry_queue(queue_name: str, delay_ms: int) -> str:
    """Where a command waits `delay_ms` before it goes back to `queue_name` (queue TTL, then dead-lettered
    back): one queue per delay, because RabbitMQ expires messages only at a queue's head."""
    return f"{queue_name}.retry.{delay_ms}ms"


def retry_delays_ms(*, max_retries: int, min_backoff_ms: int, max_backoff_ms: int) -> list[int]:
    """The wait before each retry, in milliseconds: doubling from `min_backoff_ms`, capped."""
    return [min(max_backoff_ms, min_backoff_ms * 2**n) for n in range(max_retries)]


class BrokerUnavailable(QueueUnavailable):
    """RabbitMQ did not confirm the message."""


def command_message(
    *, queue_name: str, operation_id: UUID, idempotency_key: str, command: Command, reply: ReplyTo | None = None
) -> dramatiq.Message[Any]:
    options = {} if reply is None else {"reply_to": reply.queue, "correlation_id": reply.correlation_id}
    return dramatiq.Message(
        queue_name=queue_name,
        actor_name=EXECUTE_ACTOR,
        args=(),
        kwargs={"operation_id": str(operation_id), "idempotency_key": idempotency_key, "command": command.to_json()},
        options=options,
        message_id=str(operation_id),
    )


class CommandPublisher:
    def __init__(self, amqp_url: str, *, queue_name: str) -> None:
        self.queue_name = queue_name
        self.broker = RabbitmqBroker(
            url=bounded_url(amqp_url, connect_timeout_s=CONNECT_TIMEOUT_S, blocked_timeout_s=BLOCKED_TIMEOUT_S),
            confirm_delivery=True,
        )

    def publish(self, *, operation_id: UUID, idempotency_key: str, command: Command) -> None:
        message = command_message(
            queue_name=self.queue_name, operation_id=operation_id, idempotency_key=idempotency_key, command=command
        )
        try:
            self.broker.enqueue(message)
        except Exception as exc:  # dramatiq's ConnectionClosed, pika errors, socket errors: all "not taken"
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        self.broker.close()


class AmqpCommandQueue(CommandQueue):
    """The ingress's command queue: asyncio, confirms pipelined (`ConfirmingPublisher`). It declares the
    queue and its dead-letter queue as the workers do, so a command never lands where no queue is."""

    def __init__(self, amqp_url: str, *, queue_name: str) -> None:
        self.queue_name = queue_name
        self.publisher = ConfirmingPublisher(
            amqp_url,
            topology=[
                durable_queue(queue_name, main_queue_arguments(queue_name)),
                durable_queue(dead_letter_queue(queue_name), {"x-message-ttl": DEAD_LETTER_TTL_MS}),
            ],
        )

    async def publish(self, *, operation_id: UUID, idempotency_key: str, command: Command) -> None:
        message = command_message(
            queue_name=self.queue_name, operation_id=operation_id, idempotency_key=idempotency_key, command=command
        )
        properties = pika.BasicProperties(delivery_mode=2, message_id=str(operation_id))
        try:
            await self.publisher.publish(
                exchange="", routing_key=self.queue_name, body=message.encode(), properties=properties
            )
        except PublishFailed as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self.publisher.close()
