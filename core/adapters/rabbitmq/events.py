"""Publishing ledger events to RabbitMQ, one at a time, with publisher confirms.

Events go to the durable topic exchange `ledger.events` with the event type as routing key
(`account.created`, `transaction.posted`, `transaction.rejected`...), so a consumer binds e.g.
`transaction.*` or `#`. Messages are persistent JSON; `message_id` is the event id, which consumers use to
deduplicate: delivery is at-least-once (the outbox relay republishes a batch whose commit it never saw).

The body is `{"id", "type", "tenant_id", "occurred_at", "data"}`; the header `x-outbox-position` holds the event's
place in the outbox, the order in which the ledger committed; `tenant_id` is also a header so a
headers-aware consumer can filter without parsing the body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import pika
import pika.exceptions
import structlog

from core.adapters.rabbitmq.commands import DEAD_LETTER_TTL_MS, dead_letter_queue, main_queue_arguments
from core.adapters.rabbitmq.connection import connection_parameters
from core.application.ports import Event
from core.settings import Settings

EVENTS_EXCHANGE = "ledger.events"
POSITION_HEADER = "x-outbox-position"
CONTENT_TYPE = "application/json"
PERSISTENT = 2  # AMQP delivery_mode: written to disk by durable queues

log = structlog.get_logger(__name__)

# Failures that mean "the broker is gone or refused": the connection is dropped and rebuilt on next use.
_BROKER_ERRORS: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


class PublishError(RuntimeError):
    """The broker was unreachable, closed on us, or did not confirm a message. Whether messages published
    before the failure were delivered is unknown; the caller must treat the whole batch as unpublished."""


def declare_events_exchange(channel: Any, exchange: str = EVENTS_EXCHANGE) -> None:
    """Declare the events exchange (durable topic); idempotent. Consumers may call it before binding."""
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)


def declare_subscriber_queue(channel: Any, queue: str, exchange: str = EVENTS_EXCHANGE) -> None:
    """A durable queue that must see every event (the audit trail's), bound to all of them, with its
    dead-letter queue `<queue>.XQ`. The relay declares it too: events published before its consumer first
    started wait for it instead of being dropped by an exchange with nobody bound."""
    declare_events_exchange(channel, exchange)
    channel.queue_declare(queue, durable=True, arguments=main_queue_arguments(queue))
    channel.queue_declare(dead_letter_queue(queue), durable=True, arguments={"x-message-ttl": DEAD_LETTER_TTL_MS})
    channel.queue_bind(queue, exchange, routing_key="#")


def event_body(event: Event) -> bytes:
    """The message body: the event as JSON."""
    document = {
        "id": str(event.id),
        "type": event.type,
        "tenant_id": event.tenant_id,
        "occurred_at": event.occurred_at.isoformat(),
        "data": event.payload,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def event_properties(event: Event, *, app_id: str = "cleanledger") -> pika.BasicProperties:
    headers: dict[str, Any] = {"tenant_id": event.tenant_id}
    if event.position is not None:
        # The ledger's commit order, for the audit trail's replay; a header, not in the body that webhooks
        # forward, since it counts every tenant's events.
        headers[POSITION_HEADER] = event.position
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        content_encoding="utf-8",
        delivery_mode=PERSISTENT,
        message_id=str(event.id),
        type=event.type,
        timestamp=int(event.occurred_at.timestamp()),
        app_id=app_id,
        headers=headers,
    )


class EventPublisher:
    """A synchronous publisher on one `pika.BlockingConnection` with publisher confirms.

    Connects lazily on the first `publish` (or explicitly with `connect`) and declares the exchange. After
    any broker failure the connection is dropped, `PublishError` is raised and the next call reconnects.
    Not thread-safe: one publisher per thread.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = EVENTS_EXCHANGE,
        connect_timeout: float = 5.0,
        blocked_timeout: float = 30.0,
        app_id: str = "cleanledger",
        subscriber_queues: Sequence[str] = (),
    ) -> None:
        self.exchange = exchange
        self.app_id = app_id
        self.subscriber_queues = list(subscriber_queues)  # declared with the exchange, see declare_subscriber_queue
        self._params = connection_parameters(url, connect_timeout=connect_timeout, blocked_timeout=blocked_timeout)
        self._connection: Any = None
        self._channel: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Self:
        """A publisher for `settings.amqp_url`, declaring the audit and webhook queues; `options` are the
        constructor's keyword arguments."""
        options.setdefault("subscriber_queues", [settings.audit_queue, settings.webhook_queue])
        return cls(settings.amqp_url, **options)

    @property
    def connected(self) -> bool:
        return bool(
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    def connect(self) -> None:
        """Open the connection and a confirming channel and declare the exchange, unless already open."""
        if self.connected:
            return
        self.close()
        try:
            self._connection = pika.BlockingConnection(self._params)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            declare_events_exchange(self._channel, self.exchange)
            for queue in self.subscriber_queues:
                declare_subscriber_queue(self._channel, queue, self.exchange)
        except _BROKER_ERRORS as exc:
            self.close()
            raise PublishError(f"cannot connect to RabbitMQ at {self._where()}: {exc!r}") from exc
        log.info("amqp.connected", host=self._params.host, port=self._params.port, exchange=self.exchange)

    def publish(self, event: Event) -> None:
        """Publish one event and wait for the broker's confirm. Raises `PublishError`.

        `mandatory=False`: a message no queue is bound for is confirmed and dropped by the broker, which is
        what an event stream with no subscribers yet should do.
        """
        self.connect()
        try:
            self._channel.basic_publish(
                exchange=self.exchange,
                routing_key=event.type,
                body=event_body(event),
                properties=event_properties(event, app_id=self.app_id),
                mandatory=False,
            )
        except _BROKER_ERRORS as exc:
            self.close()
            raise PublishError(f"publishing {event.type} {event.id} failed: {exc!r}") from exc

    def keepalive(self) -> bool:
        """Service the connection (heartbeats, broker-initiated closes) while idle; a BlockingConnection only
        does so inside a pika call. Returns whether the connection is still usable; a dead one is dropped
        quietly and rebuilt on the next publish."""
        if self._connection is None:
            return False
        try:
            self._connection.process_data_events(time_limit=0)
        except _BROKER_ERRORS as exc:
            log.info("amqp.connection_lost", error=repr(exc))
            self.close()
            return False
        return self.connected

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except _BROKER_ERRORS as exc:  # already broken: nothing left to release
                log.debug("amqp.close_failed", error=repr(exc))

    def _where(self) -> str:
        return f"{self._params.host}:{self._params.port}"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
