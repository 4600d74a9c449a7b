"""Dramatiq actors: settle queued commands exactly once.

Start a worker with `dramatiq workers.actors` (see Procfile). Each command runs as one SERIALIZABLE unit of
work that claims its idempotency key, posts and stores the outcome in the same commit; Dramatiq acks the
message only after the actor returns, so a worker killed mid-posting leaves the message to be redelivered
and the redelivery either posts (nothing was committed) or replays the stored outcome (it was).
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import UUID

import dramatiq
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from core.adapters.rabbitmq.commands import EXECUTE_ACTOR
from core.adapters.redis.cache import SettlementPublisher
from core.adapters.redis.client import sync_client
from core.application.commands import command_from_json
from core.application.views import OperationResult, operation_json
from core.bootstrap import LedgerService, bootstrap
from core.domain.errors import IdempotencyKeyReused, ProcessingFailed, ValidationFailed
from core.logs import configure_logging
from core.settings import Settings

RETRIES_EXHAUSTED_ACTOR = "command_retries_exhausted"
# Errors a retry cannot fix: the message itself is wrong. Dramatiq sends them straight to the dead letters.
PERMANENT_ERRORS = (ValidationFailed, IdempotencyKeyReused)

settings = Settings.from_env()
configure_logging(level=settings.log_level, json=settings.log_json)
broker = RabbitmqBroker(url=settings.amqp_url, confirm_delivery=True)
dramatiq.set_broker(broker)
log = structlog.get_logger(__name__)


class _Runtime:
    """Per-process resources, opened on first use (after Dramatiq forked the worker process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ledger: LedgerService | None = None
        self._settlements: SettlementPublisher | None = None

    def ledger(self) -> LedgerService:
        with self._lock:
            if self._ledger is None:
                self._ledger = bootstrap(settings)
            return self._ledger

    def settlements(self) -> SettlementPublisher:
        with self._lock:
            if self._settlements is None:
                self._settlements = SettlementPublisher(sync_client(settings.redis_url))
            return self._settlements


runtime = _Runtime()


def announce(tenant_id: str, outcome: OperationResult) -> None:
    """Cache the settled result in Redis and wake ingress requests waiting on it (best effort)."""
    document = {"tenant_id": tenant_id, "operation": operation_json(outcome)}
    runtime.settlements().settled(str(outcome.operation_id), document, ttl_s=settings.result_cache_s)


@dramatiq.actor(
    actor_name=EXECUTE_ACTOR,
    queue_name=settings.command_queue,
    max_retries=settings.worker_max_retries,
    min_backoff=settings.worker_min_backoff_ms,
    max_backoff=settings.worker_max_backoff_ms,
    throws=PERMANENT_ERRORS,
    on_retry_exhausted=RETRIES_EXHAUSTED_ACTOR,
)
def execute_command(operation_id: str, idempotency_key: str, command: dict[str, Any]) -> None:
    structlog.contextvars.bind_contextvars(operation_id=operation_id)
    try:
        cmd = command_from_json(command)
        outcome = runtime.ledger().execute(cmd, idempotency_key=idempotency_key, operation_id=UUID(operation_id))
        log.info("operation.settled", status=str(outcome.status), replayed=outcome.replayed, type=cmd.type)
        announce(cmd.tenant_id, outcome)
    finally:
        structlog.contextvars.unbind_contextvars("operation_id")


@dramatiq.actor(actor_name=RETRIES_EXHAUSTED_ACTOR, queue_name=settings.command_queue, max_retries=20)
def command_retries_exhausted(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
    """Settle an operation whose command kept failing transiently as `processing-failed`. The original
    message stays in the dead-letter queue (`<queue>.XQ`) for inspection and replay."""
    kwargs = message_data.get("kwargs", {})
    cmd = command_from_json(kwargs["command"])
    error = ProcessingFailed(
        f"gave up after {retry_info.get('retries', '?')} retries", retries=retry_info.get("retries")
    )
    outcome = runtime.ledger().give_up(
        cmd, idempotency_key=kwargs["idempotency_key"], operation_id=UUID(kwargs["operation_id"]), error=error
    )
    log.error("operation.processing_failed", operation_id=kwargs["operation_id"], status=str(outcome.status))
    announce(cmd.tenant_id, outcome)
