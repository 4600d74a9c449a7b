"""Commands onto RabbitMQ as Dramatiq messages, so Dramatiq workers consume them unchanged.

Blocking (pika under Dramatiq's broker): the aiohttp ingress calls `publish` on its bounded thread pool,
never on the event loop. Publisher confirms are on: `publish` returns only once RabbitMQ has taken
responsibility for the (persistent) message, and raises `BrokerUnavailable` otherwise.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from core.application.commands import Command

# The actor the workers register for commands (workers/actors.py).
EXECUTE_ACTOR = "execute_command"
# pika connection parameters added unless the URL sets them: fail fast instead of hanging a request.
FAST_FAIL_PARAMETERS = {
    "connection_attempts": "1",
    "retry_delay": "0",
    "socket_timeout": "2",
    "blocked_connection_timeout": "5",
}


class BrokerUnavailable(Exception):
    """RabbitMQ did not confirm the message."""


def with_fast_fail(url: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in FAST_FAIL_PARAMETERS.items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query)))


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
        self.broker = RabbitmqBroker(url=with_fast_fail(amqp_url), confirm_delivery=True)

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
