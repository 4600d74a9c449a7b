"""Where the tests find their real services: environment variables first, then a testcontainers container
when a Docker engine answers, else this machine's local services."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import psycopg

from core.settings import Settings

# The server ops/services found or started (CLEANLEDGER_DATABASE_URL), its maintenance database.
LOCAL_POSTGRES = psycopg.conninfo.make_conninfo(
    os.environ.get("CLEANLEDGER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/cleanledger"), dbname="postgres"
)


def docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_admin_url() -> Iterator[str]:
    """A URL to a PostgreSQL server's maintenance database, where tests may create databases."""
    url = os.environ.get("CLEANLEDGER_TEST_POSTGRES_URL")
    if url:
        yield url
    elif os.environ.get("CLEANLEDGER_TEST_USE_CONTAINERS") == "1" and docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        yield LOCAL_POSTGRES


def private_queues(settings: Settings, suffix: str, **overrides: Any) -> Settings:
    """`settings` with command queue, request exchange, request queue and webhook queue of their own (named
    `<name>.<suffix>`): for a test's own worker or ingress, so `delete_queues` of it leaves the session's alone."""
    return settings.replace(
        command_queue=f"{settings.command_queue}.{suffix}",
        request_exchange=f"{settings.request_exchange}.{suffix}",
        request_queue=f"{settings.request_queue}.{suffix}",
        audit_queue=f"{settings.audit_queue}.{suffix}",
        webhook_queue=f"{settings.webhook_queue}.{suffix}",
        **overrides,
    )


def delete_queues(settings: Settings) -> None:
    """Remove a test run's command queue, the delay, retry and dead-letter queues beside it, and the queue and
    exchange of direct AMQP producers, and the webhook fan-out queue."""
    import pika

    from core.adapters.rabbitmq.commands import retry_delays_ms, retry_queue

    delays = retry_delays_ms(
        max_retries=settings.worker_max_retries,
        min_backoff_ms=settings.worker_min_backoff_ms,
        max_backoff_ms=settings.worker_max_backoff_ms,
    )
    queue = settings.command_queue

    try:
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    except pika.exceptions.AMQPError:
        return
    try:
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ", *(retry_queue(queue, ms) for ms in set(delays))):
            channel.queue_delete(name)
        channel.queue_delete(settings.request_queue)
        channel.queue_delete(f"{settings.request_queue}.XQ")
        channel.queue_delete(settings.audit_queue)
        channel.queue_delete(f"{settings.audit_queue}.XQ")
        channel.exchange_delete(settings.request_exchange)
        channel.queue_delete(settings.webhook_queue)
        channel.queue_delete(f"{settings.webhook_queue}.XQ")
    finally:
        connection.close()


def delete_exchange(settings: Settings, exchange: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        connection.channel().exchange_delete(exchange)
    finally:
        connection.close()
