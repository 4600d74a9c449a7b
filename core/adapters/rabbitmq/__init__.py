"""RabbitMQ adapters: commands onto the queue, the ledger's events onto `ledger.events`."""

from core.adapters.rabbitmq.connection import connection_parameters
from core.adapters.rabbitmq.events import (
    EVENTS_EXCHANGE,
    EventPublisher,
    PublishError,
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
