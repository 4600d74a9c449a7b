"""Publishing ledger events to RabbitMQ, in batches, with pipelined publisher confirms.

Events go to the durable topic exchange `ledger.events` with the event type as routing key
(`account.created`, `transaction.posted`, `transaction.rejected`...), so a consumer binds e.g.
`transaction.*` or `#`. Messages are persistent JSON; `message_id` is the event id, which consumers use to
deduplicate: delivery is at-least-once (the outbox relay republishes a batch whose commit it never saw).

The body is `{"id", "type", "tenant_id", "occurred_at", "data"}`; the header `x-outbox-position` holds the event's
place in the outbox, the order in which the ledger committed; `tenant_id` is also a header so a
headers-aware consumer can filter without parsing the body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import pika

from core.adapters import json_text
from core.adapters.rabbitmq.commands import DEAD_LETTER_TTL_MS, dead_letter_queue, main_queue_arguments
from core.adapters.rabbitmq.confirms import (
    ConfirmingPublisher,
    Declaration,
    PublishFailed,
    binding,
    durable_exchange,
    durable_queue,
)
from core.application.ports import Event
from core.settings import Settings

EVENTS_EXCHANGE = "ledger.events"
POSITION_HEADER = "x-outbox-position"
CONTENT_TYPE = "application/json"
PERSISTENT = 2  # AMQP delivery_mode: written to disk by durable queues


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


def subscriber_queue_topology(queue: str, exchange: str) -> list[Declaration]:
    """What `declare_subscriber_queue` declares, as steps for a `ConfirmingPublisher` (asyncio)."""
    return [
        durable_exchange(exchange, "topic"),
        durable_queue(queue, main_queue_arguments(queue)),
        durable_queue(dead_letter_queue(queue), {"x-message-ttl": DEAD_LETTER_TTL_MS}),
        binding(queue, exchange, "#"),
    ]


def event_body(event: Event) -> bytes:
    """The message body: the event as JSON."""
    document = {
        "id": str(event.id),
        "type": event.type,
        "tenant_id": event.tenant_id,
        "occurred_at": event.occurred_at.isoformat(),
        "data": event.payload,
    }
    return json_text.dumps(document).encode()


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
    """A synchronous facade for the relay's thread over `ConfirmingPublisher`, on a private event loop.

    `publish_batch` sends a whole batch back to back and waits for all its confirms at once: the broker
    confirms them together, so a batch costs about one round trip and one disk sync instead of one per event.
    Connects lazily on the first publish (or explicitly with `connect`) and declares the exchange and the
    subscriber queues on every connect. After any broker failure `PublishError` is raised and the next call
    reconnects. Not thread-safe: one publisher per thread.
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
        topology = [durable_exchange(exchange, "topic")]
        for queue in self.subscriber_queues:
            topology += subscriber_queue_topology(queue, exchange)
        self._loop = asyncio.new_event_loop()
        self._publisher = ConfirmingPublisher(
            url, topology=topology, timeout_s=blocked_timeout, connect_timeout_s=connect_timeout
        )
        self._where = url.rpartition("@")[2].partition("/")[0]  # host:port, without the credentials

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Self:
        """A publisher for `settings.amqp_url`, declaring the audit and webhook queues; `options` are the
        constructor's keyword arguments."""
        options.setdefault("subscriber_queues", [settings.audit_queue, settings.webhook_queue])
        options.setdefault("exchange", settings.events_exchange)
        return cls(settings.amqp_url, **options)

    @property
    def connected(self) -> bool:
        return self._publisher.connected

    def connect(self) -> None:
        """Open the connection and a confirming channel and declare the topology, unless already open."""
        try:
            self._loop.run_until_complete(self._publisher.connect())
        except PublishFailed as exc:
            raise PublishError(f"cannot connect to RabbitMQ at {self._where}: {exc}") from exc

    def publish(self, event: Event) -> None:
        """Publish one event and wait for the broker's confirm. Raises `PublishError`."""
        self.publish_batch([event])

    def publish_batch(self, events: Sequence[Event]) -> None:
        """Publish every event, confirms pipelined, and return once the broker confirmed them all. Raises
        `PublishError` if any was not confirmed: which ones arrived is then unknown, so the caller treats the
        whole batch as unpublished (consumers deduplicate by event id).

        `mandatory=False`: a message no queue is bound for is confirmed and dropped by the broker, which is
        what an event stream with no subscribers yet should do.
        """
        errors = self._loop.run_until_complete(self._publish_all(events))
        failed = [(event, error) for event, error in zip(events, errors, strict=True) if error is not None]
        if failed:
            event, error = failed[0]
            raise PublishError(
                f"{len(failed)} of {len(events)} events unconfirmed, first {event.type} {event.id}: {error}"
            )

    async def _publish_all(self, events: Sequence[Event]) -> list[BaseException | None]:
        results = await asyncio.gather(
            *(
                self._publisher.publish(
                    exchange=self.exchange,
                    routing_key=event.type,
                    body=event_body(event),
                    properties=event_properties(event, app_id=self.app_id),
                    mandatory=False,
                )
                for event in events
            ),
            return_exceptions=True,
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    def keepalive(self) -> bool:
        """Service the connection (heartbeats, broker-initiated closes) while idle: the private loop only runs
        inside a call. Returns whether the connection is usable; a dead one is rebuilt on the next publish."""
        self._loop.run_until_complete(asyncio.sleep(0))
        return self.connected

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.run_until_complete(self._publisher.close())
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
