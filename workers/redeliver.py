"""Sweeper: re-enqueue pending operations whose command may never have reached RabbitMQ, and expire holds.

The ingress records an operation, then publishes its command; if the ingress dies between the two, the
operation would stay pending forever. This sweeper finds operations still pending `redeliver_after_s` after
their last enqueue and publishes their command again. Workers settle each operation exactly once, so a
second copy of a command that did arrive is harmless (it replays).

Every `hold_expiry_interval_s` it also releases the pending holds past their expiry: one `ExpireHold` per hold
under the hold's own expiry key, settled in one group commit, so a hold expires once however many sweepers
run or crash half-way (a capture or void that got there first makes the expiry a refused no-op).

Run with `python -m workers.redeliver` (see Procfile).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import structlog
from psycopg_pool import ConnectionPool

from core.adapters.metrics import DEAD_LETTERS, HOLDS_EXPIRED, OPERATIONS_REQUEUED, PENDING_OLDEST_SECONDS
from core.adapters.postgres.db import open_pool
from core.adapters.postgres.operations import lock_stale_pending, mark_enqueued_in, oldest_pending_age_s
from core.adapters.rabbitmq.commands import BrokerUnavailable, CommandPublisher, dead_letter_queue
from core.adapters.rabbitmq.connection import queue_depth
from core.application.commands import ExpireHold, command_from_json
from core.application.group_commit import Unsettled
from core.application.ports import Submission
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService, bootstrap, redelivery_publisher
from core.domain.errors import LedgerError
from core.domain.ids import new_id
from core.entrypoint import start

log = structlog.get_logger(__name__)
# Operations re-enqueued per sweep, at most.
BATCH_SIZE = 500


class RedeliverySweeper:
    def __init__(self, pool: ConnectionPool, publisher: CommandPublisher, *, redeliver_after_s: float) -> None:
        self.pool = pool
        self.publisher = publisher
        self.redeliver_after_s = redeliver_after_s

    def run_once(self) -> int:
        """Re-enqueue one batch of stale pending operations; returns how many were published."""
        published = 0
        with self.pool.connection() as conn, conn.transaction():
            rows = lock_stale_pending(conn, older_than_s=self.redeliver_after_s, limit=BATCH_SIZE)
            for operation_id, key, request in rows:
                try:
                    command = command_from_json(request)
                except LedgerError as exc:
                    # One stored request that no longer rebuilds must not stop the sweep for everyone: it is
                    # logged, and looked at again only after another `redeliver_after_s`.
                    log.error("redeliver.request_unreadable", operation_id=str(operation_id), error=exc.detail)
                    mark_enqueued_in(conn, operation_id)
                    continue
                try:
                    self.publisher.publish(operation_id=operation_id, idempotency_key=key, command=command)
                except BrokerUnavailable as exc:
                    log.warning("redeliver.broker_unavailable", error=str(exc))
                    break
                mark_enqueued_in(conn, operation_id)
                log.info("redeliver.published", operation_id=str(operation_id))
                published += 1
            PENDING_OLDEST_SECONDS.set(oldest_pending_age_s(conn))
        OPERATIONS_REQUEUED.inc(published)
        return published


class HoldExpiry:
    def __init__(self, ledger: LedgerService) -> None:
        self.ledger = ledger

    def run_once(self) -> int:
        """Expire one batch of holds past their expiry; returns how many this call expired."""
        due = self.ledger.queries.due_holds(limit=BATCH_SIZE)
        if not due:
            return 0
        submissions = [
            Submission(ExpireHold(tenant, hold_id, as_of), ExpireHold.expiry_key(hold_id), new_id())
            for tenant, hold_id, as_of in due
        ]
        expired = 0
        for submission, outcome in zip(submissions, self.ledger.settle_group(submissions), strict=True):
            if isinstance(outcome, OperationResult) and outcome.status is OperationStatus.SUCCEEDED:
                expired += 1
            elif isinstance(outcome, Unsettled):  # looked at again by the next sweep
                log.warning("holds.expiry_failed", key=submission.idempotency_key, error=str(outcome.error))
        HOLDS_EXPIRED.inc(expired)
        return expired


def main() -> None:
    settings = start("redeliver", "Redelivery sweeper: queues again the commands of operations pending too long.")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pool = open_pool(settings, min_size=1, max_size=1)
    sweeper = RedeliverySweeper(
        pool,
        redelivery_publisher(settings),
        redeliver_after_s=settings.redeliver_after_s,
    )
    ledger = bootstrap(settings, pool_size=2)
    holds = HoldExpiry(ledger)
    interval_s = max(1.0, settings.redeliver_after_s / 4)  # seconds between sweeps
    log.info("redeliver.started", interval_s=interval_s, hold_expiry_interval_s=settings.hold_expiry_interval_s)
    dead_letter_queues = [dead_letter_queue(q) for q in (settings.command_queue, settings.request_queue)]
    next_sweep = 0.0
    while not stop.is_set():
        try:
            holds.run_once()
        except Exception:
            log.exception("holds.expiry_sweep_failed")
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + interval_s
            try:
                sweeper.run_once()
            except Exception:
                log.exception("redeliver.sweep_failed")
            for queue in dead_letter_queues:
                depth = queue_depth(settings.amqp_url, queue)
                if depth is not None:  # not declared yet, or RabbitMQ down: the last value stands
                    DEAD_LETTERS.labels(queue).set(depth)
        stop.wait(settings.hold_expiry_interval_s)
    ledger.close()
    pool.close()


if __name__ == "__main__":
    main()
