"""Prometheus metrics of this process (`prometheus_client`'s default registry), named `cleanledger_*`. The
ingress serves them at `GET /metrics`; adapters record what only they see (a publish's confirm latency)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

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


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
