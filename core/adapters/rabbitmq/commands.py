"""Commands onto RabbitMQ as Dramatiq messages, so Dramatiq workers consume them unchanged.

Blocking (pika under Dramatiq's broker): the aiohttp ingress calls `publish` on its bounded thread pool,
never on the event loop. Publisher confirms are on: `publish` returns only once RabbitMQ has taken
responsibility for the (persistent) message, and raises `BrokerUnavailable` otherwise.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from core.adapters.rabbitmq.connection import bounded_url
from core.application.commands import Command

# The actor the workers register for commands (workers/actors.py).
EXECUTE_ACTOR = "execute_command"
# Bounds of one publish from an HTTP request, in seconds: connecting, and waiting out a blocked broker.
CONNECT_TIMEOUT_S = 2.0
BLOCKED_TIMEOUT_S = 5.0


class BrokerUnavailable(Exception):
    """RabbitMQ did not confirm the message."""


def command_message(
    *, queue_name: str, operation_id: UUID, idempotency_key: str, command: Command
) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=queue_name,
        actor_name=EXECUTE_ACTOR,
        args=(),
        kwargs={"operation_id": str(operation_id), "idempotency_key": idempotency_key, "command": command.to_json()},
        options={},
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
