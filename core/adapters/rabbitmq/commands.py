"""Commands onto RabbitMQ, in Dramatiq's message format (the queue, its arguments and its dead-letter queue
are Dramatiq's too), and read back by the group-commit consumer (`consumer.py`).

Two publishers, both with publisher confirms (a publish returns only once RabbitMQ has taken responsibility
for the persistent message): `AmqpCommandQueue` for the asyncio ingress, every request's confirm pipelined
on one shared channel; and the blocking `CommandPublisher` (pika under Dramatiq's broker) for the
redelivery sweeper and tests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import dramatiq
import orjson
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from core.adapters import json_text
from core.adapters.metrics import ACCEPT_GROUP_SIZE, PUBLISH_CONFIRM_SECONDS
from core.adapters.rabbitmq.confirms import ConfirmingPublisher, PublishFailed, durable_queue
from core.adapters.rabbitmq.connection import bounded_url
from core.application.commands import Command, command_from_json, validate_idempotency_key
from core.application.ports import Claim, CommandQueue, QueueUnavailable
from core.domain.errors import ValidationFailed

# The actor names command messages carry (Dramatiq's message format; workers/consumer.py reads them): one
# command, or a batch (the commands one ingress accepted together, published as one message).
EXECUTE_ACTOR = "execute_command"
EXECUTE_BATCH_ACTOR = "execute_commands"
# Header of a batch message: how many commands it carries (a worker's group counts commands, not messages).
COMMANDS_HEADER = "x-commands"
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
    request: dict[str, Any]  # the command's JSON form as the message carried it: `command.to_json()`


def parse_command_message(body: bytes) -> list[tuple[dict[str, Any], QueuedCommand]]:
    """The commands a message carries, each with the single-command message a retry of it sends on: one for
    an `execute_command` message, many for an `execute_commands` batch. `ValidationFailed` when the message
    is not one of them; a batch is refused whole."""
    try:
        document = orjson.loads(body)
        options = document.get("options", {})
        retries = options.get("retries", 0)
        if type(retries) is not int or retries < 0:
            raise ValueError("options.retries must be a non-negative integer")
        reply_to, correlation_id = options.get("reply_to"), options.get("correlation_id")
        reply = ReplyTo(str(reply_to), None if correlation_id is None else str(correlation_id)) if reply_to else None
        if document.get("actor_name") == EXECUTE_BATCH_ACTOR:
            items = document["kwargs"]["commands"]
            if not isinstance(items, list) or not items:
                raise ValueError("kwargs.commands must be a non-empty list")
            single = {k: v for k, v in document.items() if k != "kwargs"} | {"actor_name": EXECUTE_ACTOR}
            return [
                (single | {"kwargs": item, "message_id": item["operation_id"]}, _queued(item, 0, None))
                for item in items
            ]
        return [(document, _queued(document["kwargs"], retries, reply))]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # orjson's JSONDecodeError is a ValueError
        raise ValidationFailed(f"not a command message: {exc}") from None


def _queued(kwargs: dict[str, Any], retries: int, reply: ReplyTo | None) -> QueuedCommand:
    return QueuedCommand(
        UUID(kwargs["operation_id"]),
        validate_idempotency_key(kwargs["idempotency_key"]),
        command_from_json(kwargs["command"]),
        retries,
        reply,
        kwargs["command"],
    )


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


def command_batch_message(*, queue_name: str, claims: Sequence[Claim]) -> dramatiq.Message[Any]:
    """One message for the commands of many claims (each later settled, retried or given up on its own by the
    workers), in the JSON form they were recorded with."""
    return dramatiq.Message(
        queue_name=queue_name,
        actor_name=EXECUTE_BATCH_ACTOR,
        args=(),
        kwargs={
            "commands": [
                {"operation_id": str(c.operation_id), "idempotency_key": c.key, "command": c.request} for c in claims
            ]
        },
        options={},
        message_id=str(claims[0].operation_id),
    )


def message_body(message: dramatiq.Message[Any]) -> bytes:
    """A message as Dramatiq's JSON, written by orjson: Dramatiq's own encoder is the standard library's, and
    a batch's message carries 1,000 commands (6 % of an ingress node's CPU, py-spy)."""
    return json_text.dumps(message.asdict()).encode()


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

    def __init__(self, amqp_url: str, *, queue_name: str, name: str | None = None) -> None:
        self.queue_name = queue_name
        self.publisher = ConfirmingPublisher(
            amqp_url,
            name=name or f"cleanledger ingress {os.getpid()}",
            topology=[
                durable_queue(queue_name, main_queue_arguments(queue_name)),
                durable_queue(dead_letter_queue(queue_name), {"x-message-ttl": DEAD_LETTER_TTL_MS}),
            ],
        )

    async def publish(self, claims: Sequence[Claim]) -> None:
        message = command_batch_message(queue_name=self.queue_name, claims=claims)
        properties = pika.BasicProperties(
            delivery_mode=2, message_id=message.message_id, headers={COMMANDS_HEADER: len(claims)}
        )
        ACCEPT_GROUP_SIZE.observe(len(claims))
        started = time.perf_counter()
        try:
            await self.publisher.publish(
                exchange="", routing_key=self.queue_name, body=message_body(message), properties=properties
            )
        except PublishFailed as exc:
            PUBLISH_CONFIRM_SECONDS.labels("failed").observe(time.perf_counter() - started)
            raise BrokerUnavailable(str(exc)) from exc
        PUBLISH_CONFIRM_SECONDS.labels("confirmed").observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self.publisher.close()
