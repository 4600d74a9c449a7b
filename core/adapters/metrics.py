"""Prometheus metrics of this process (`prometheus_client`'s default registry), named `cleanledger_*`. An ingress
node serves them at `GET /metrics`; every other process kind (worker, relay, redeliver, webhooks, audit) serves
them at `http://127.0.0.1:<port>/metrics` when started with `--metrics-port <port>` (`serve_metrics`). Each
process records what only it sees: the ingress its requests and publish confirms, a worker its groups and
settlements, the relay the outbox, the sweeper what is overdue and dead-lettered, the webhook worker its
attempts, the audit consumer what it wrote."""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from core.application.retry import RetryCounter

log = structlog.get_logger(__name__)

# Seconds: from a millisecond to the longest `Prefer: wait` (30 s).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUEST_SECONDS = Histogram(
    "cleanledger_http_request_seconds",
    "HTTP requests by route template, method and status, and how long they took",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS_S,
)
OPERATIONS_ACCEPTED = Counter(
    "cleanledger_operations_accepted_total",
    "Commands accepted by this ingress: new operations, and duplicates answered with an existing one",
    ["outcome"],
)
ACCEPT_GROUP_SIZE = Histogram(
    "cleanledger_accept_group_commands",
    "Commands per accepted group (one record statement, one queued message)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PUBLISH_CONFIRM_SECONDS = Histogram(
    "cleanledger_publish_confirm_seconds",
    "From publishing a command message to RabbitMQ's confirm (or its failure)",
    ["result"],
    buckets=LATENCY_BUCKETS_S,
)

REQUEST_RECORDS = Counter(
    "cleanledger_request_records_total",
    "Records of mutating requests for the audit trail: queued (confirmed by RabbitMQ), or lost (dropped "
    "unqueued: the backlog overflowed or the node stopped with RabbitMQ unreachable)",
    ["result"],
)
REQUEST_RECORDS_UNSENT = Gauge(
    "cleanledger_request_records_unsent",
    "Records of requests RabbitMQ has not confirmed yet, kept for the next attempt",
)

# --- workers (workers/consumer.py) -----------------------------------------------------------------------
GROUP_COMMANDS = Histogram(
    "cleanledger_worker_group_commands",
    "Commands per group a worker settled in one unit of work (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
GROUP_SECONDS = Histogram(
    "cleanledger_worker_group_seconds",
    "How long a worker took to settle a group (the unit of work, its retries included)",
    buckets=LATENCY_BUCKETS_S,
)
OPERATIONS_SETTLED = Counter(
    "cleanledger_operations_settled_total", "Operations a worker settled, by outcome", ["outcome"]
)
COMMANDS_RETRIED = Counter(
    "cleanledger_commands_retried_total", "Commands that failed on their own, sent to a retry queue"
)
COMMANDS_GIVEN_UP = Counter(
    "cleanledger_commands_given_up_total", "Commands that kept failing: settled as processing-failed"
)
# --- the outbox relay ------------------------------------------------------------------------------------
OUTBOX_PUBLISHED = Counter("cleanledger_outbox_published_total", "Outbox events the relay published")
OUTBOX_BACKLOG = Gauge(
    "cleanledger_outbox_backlog_events", "Events staged and not yet published, as the relay last counted"
)
# --- the redelivery sweeper ------------------------------------------------------------------------------
PENDING_OLDEST_SECONDS = Gauge(
    "cleanledger_pending_operation_oldest_seconds",
    "Age of the oldest operation still pending, as the sweeper last looked (0: none pending)",
)
OPERATIONS_REQUEUED = Counter(
    "cleanledger_operations_requeued_total", "Pending operations the sweeper queued again (overdue)"
)
HOLDS_EXPIRED = Counter("cleanledger_holds_expired_total", "Pending holds the sweeper released past their expiry")
DEAD_LETTERS = Gauge(
    "cleanledger_dead_letter_messages", "Messages kept in a dead-letter queue, as the sweeper last looked", ["queue"]
)
# --- webhooks and the audit trail ------------------------------------------------------------------------
WEBHOOK_ATTEMPTS = Counter(
    "cleanledger_webhook_attempts_total", "Webhook delivery attempts, by what came of them", ["outcome"]
)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "cleanledger_webhook_attempt_seconds", "How long a webhook delivery attempt took", buckets=LATENCY_BUCKETS_S
)
AUDIT_RECORDS_WRITTEN = Counter(
    "cleanledger_audit_records_written_total", "Records the audit consumer wrote to the audit store (new ones)"
)


class RetryCollector(Collector):
    """The serialization retries of a process's units of work, read from its `RetryCounter` when scraped."""

    def __init__(self, counter: RetryCounter) -> None:
        self.counter = counter

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "cleanledger_serialization_retries",
            "Units of work run again after a serialization failure or deadlock (exhausted: given up)",
            labels=["result"],
        )
        family.add_metric(["retried"], self.counter.retries)
        family.add_metric(["exhausted"], self.counter.exhausted)
        yield family


def watch_retries(counter: RetryCounter) -> None:
    REGISTRY.register(RetryCollector(counter))


def serve_metrics(port: int) -> None:
    """Serve this process's metrics on 127.0.0.1:`port` (a thread of prometheus_client's): only a scraper on the
    machine reaches them. A port already taken is logged, and the process does its work without them."""
    try:
        start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        log.error("metrics.port_unavailable", port=port, error=str(exc))


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
