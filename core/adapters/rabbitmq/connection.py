"""The one place that turns an AMQP URL into bounded connection settings, for every RabbitMQ client here
(the command publisher under Dramatiq, the event publisher of the outbox relay).

A request or a relay batch must fail fast when the broker is gone, not hang: one connection attempt, a
capped connect/handshake time, and a cap on how long a publish may wait while the broker blocks publishers
(memory or disk alarm). Anything the URL's query string already sets wins.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika


def bounded_url(url: str, *, connect_timeout_s: float, blocked_timeout_s: float) -> str:
    """`url` with bounded-wait query parameters added (seconds, as pika reads them)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    defaults = {
        "connection_attempts": "1",
        "retry_delay": "0",
        "socket_timeout": str(connect_timeout_s),  # TCP connect
        "stack_timeout": str(connect_timeout_s),  # the whole TCP/TLS/AMQP bring-up
        "blocked_connection_timeout": str(blocked_timeout_s),
    }
    for name, value in defaults.items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query)))


def connection_parameters(
    url: str, *, connect_timeout: float = 5.0, blocked_timeout: float = 30.0
) -> pika.URLParameters:
    """`pika.URLParameters` for `url` with the bounds of `bounded_url` (seconds)."""
    return pika.URLParameters(bounded_url(url, connect_timeout_s=connect_timeout, blocked_timeout_s=blocked_timeout))


def queue_depth(url: str, queue: str) -> int | None:
    """Messages waiting in `queue`; None when it does not exist or RabbitMQ cannot be reached."""
    try:
        connection = pika.BlockingConnection(connection_parameters(url))
    except pika.exceptions.AMQPError:
        return None
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.AMQPError:
        return None
    finally:
        if connection.is_open:
            connection.close()
