"""A small typed producer for internal systems that send commands straight to RabbitMQ (see `requests.py`).

    producer = LedgerProducer("amqp://guest:guest@127.0.0.1:5672/%2F", api_key=KEY)
    answer = producer.send("transfer", {...}, idempotency_key="rent-2026-12", timeout_s=10)
    answer.document["status"]  # "succeeded" / "failed", or answer.problem with the refusal's code

It publishes with publisher confirms (a command RabbitMQ did not take raises), then waits for the answer on a
private reply queue. Blocking and not thread-safe: one per thread. A timeout does not mean the command was
lost: send it again with the same idempotency key to get its answer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import pika

from core.adapters.rabbitmq.connection import connection_parameters
from core.adapters.rabbitmq.requests import AUTHORIZATION_HEADER

DEFAULT_EXCHANGE = "ledger.requests"


@dataclass(frozen=True, slots=True)
class Answer:
    problem: bool  # True: the message was refused, `document` is an RFC 9457 problem with its `code`
    document: dict[str, Any]  # otherwise the operation: {"id", "status", "result" | "problem"}


class LedgerProducer:
    def __init__(self, amqp_url: str, *, api_key: str, exchange: str = DEFAULT_EXCHANGE) -> None:
        self.exchange = exchange
        self._api_key = api_key
        self._connection = pika.BlockingConnection(connection_parameters(amqp_url))
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        self._replies: str = self._channel.queue_declare("", exclusive=True).method.queue

    def send(
        self, command_type: str, body: Mapping[str, Any], *, idempotency_key: str, timeout_s: float = 10.0
    ) -> Answer:
        """Publish one command and wait up to `timeout_s` seconds for its answer (`TimeoutError` after)."""
        correlation_id = uuid.uuid4().hex
        self._channel.basic_publish(
            self.exchange,
            command_type,
            json.dumps(dict(body)).encode(),
            pika.BasicProperties(
                message_id=idempotency_key,
                correlation_id=correlation_id,
                reply_to=self._replies,
                headers={AUTHORIZATION_HEADER: f"Bearer {self._api_key}"},
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
            mandatory=True,  # an unknown command type is unroutable: raised here, not lost
        )
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            method, properties, payload = self._channel.basic_get(self._replies, auto_ack=True)
            if method is None:
                self._connection.sleep(min(0.01, remaining))
            elif properties.correlation_id == correlation_id:  # an earlier call's late answer is skipped
                return Answer(properties.content_type == "application/problem+json", json.loads(payload))
        raise TimeoutError(f"no answer to {command_type} {idempotency_key!r} within {timeout_s}s")

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
