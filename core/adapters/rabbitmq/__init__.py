"""RabbitMQ adapters: publishing the ledger's events."""

from core.adapters.rabbitmq.events import (
    EVENTS_EXCHANGE,
    EventPublisher,
    PublishError,
    connection_parameters,
    declare_events_exchange,
    event_body,
)

__all__ = [
    "EVENTS_EXCHANGE",
    "EventPublisher",
    "PublishError",
    "connection_parameters",
    "declare_events_exchange",
    "event_body",
]
