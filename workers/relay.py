"""Transactional-outbox relay: publishes the events staged in `outbox` to RabbitMQ's `ledger.events`.

One batch is one PostgreSQL transaction:

    SELECT ... FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT n FOR UPDATE SKIP LOCKED
    publish them all, confirms pipelined, and wait until the broker confirmed every one
    UPDATE outbox SET published_at = now() WHERE position = ANY(...)
    COMMIT

SKIP LOCKED lets several relays run side by side, each taking rows the others have not locked. If the
broker fails part-way, the transaction rolls back and the rows are retried later, so delivery is
at-least-once (also when the commit itself is lost after the confirms): consumers deduplicate by event
id (`message_id`). Order is by outbox position within a batch only; with several relays, or a retry,
events may arrive out of order, so consumers must not rely on it (entries carry per-account sequences).

Between batches `run_forever` sleeps on LISTEN `cleanledger_outbox` (migration 0003 notifies on every
INSERT into `outbox`, delivered at commit), with a periodic poll as a fallback for a lost notification.
Now and then it also prunes events published more than `outbox_retention_s` ago: the outbox is a queue,
not the record (the ledger's tables are), and left alone it would grow by one row per posting forever.

Run it with `python -m workers.relay`; SIGTERM/SIGINT stop it after the batch in progress.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, Self

import psycopg
import structlog
from psycopg import Connection
from psycopg.rows import TupleRow

from core.adapters.metrics import OUTBOX_BACKLOG, OUTBOX_PUBLISHED
from core.adapters.postgres.db import connect
from core.adapters.rabbitmq.events import EventPublisher, PublishError
from core.application.ports import Event
from core.entrypoint import add_metrics_option, parser_for, serve_metrics_if_asked, tune_garbage_collector
from core.logs import configure_logging
from core.settings import Settings, settings_or_exit

NOTIFY_CHANNEL = "cleanledger_outbox"
STOP_CHECK_INTERVAL = 0.5  # seconds: how often an idle relay looks at its stop flag and the AMQP link
MIN_BACKOFF = 0.5  # seconds: first wait after a failed batch; doubles up to `max_backoff`

SELECT_BATCH = (
    "SELECT position, event_id, event_type, tenant_id, payload, occurred_at FROM outbox"
    " WHERE published_at IS NULL ORDER BY position LIMIT %s FOR UPDATE SKIP LOCKED"
)
MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE position = ANY(%s)"
COUNT_UNPUBLISHED = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
BACKLOG_COUNT_INTERVAL_S = 5.0  # how often the relay counts the unpublished events for its metric, seconds
# Oldest positions first, along the primary key. The boundary is the first row that must stay (unpublished, or
# published within the retention): every row below it may go. Both scans start at the table's low end, where
# earlier prunes left nothing, so they read only what they return however long the outbox is; an old row
# still unpublished holds the boundary back until the relay publishes it.
PRUNE_BATCH = (
    "WITH boundary AS (SELECT coalesce((SELECT position FROM outbox"
    "   WHERE published_at IS NULL OR published_at >= now() - make_interval(secs => %s)"
    "   ORDER BY position LIMIT 1), 9223372036854775807) AS position),"
    " batch_end AS (SELECT max(position) AS position FROM (SELECT position FROM outbox"
    "   WHERE position < (SELECT position FROM boundary) ORDER BY position LIMIT %s) AS batch)"
    " DELETE FROM outbox WHERE position <= (SELECT position FROM batch_end)"
)
PRUNE_BATCH_SIZE = 5_000  # rows deleted per statement, so a prune never holds many locks or runs long
PRUNE_INTERVAL = 60.0  # seconds between two prunes by a running relay

log = structlog.get_logger(__name__)


def event_from_row(row: Sequence[Any]) -> Event:
    position, event_id, event_type, tenant_id, payload, occurred_at = row
    return Event(event_type, tenant_id, payload, occurred_at, id=event_id, position=position)


def _notified(listener: Connection[TupleRow], *, timeout: float) -> bool:
    """Whether a notification arrives within `timeout` seconds (0: one is already queued)."""
    notifies = listener.notifies(timeout=timeout, stop_after=1)
    try:
        return next(notifies, None) is not None
    finally:
        notifies.close()  # the generator holds the connection's lock until closed


class OutboxRelay:
    """Moves staged events from the outbox to RabbitMQ.

    batch_size: rows claimed, published and marked per transaction (and the most a batch holds locked).
    poll_interval: seconds an idle relay waits for a NOTIFY before looking at the table anyway; only a
        fallback, since commits that stage events wake it at once.
    max_backoff: seconds; cap of the doubling wait after a failed batch (broker or database down).
    publisher: defaults to an `EventPublisher` on `settings.amqp_url`; the relay owns and closes it.
    connect_timeout: seconds, bounding a broker connection attempt (default publisher only).

    Not thread-safe: one relay per thread; run several (threads or processes) to scale out.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int = 500,
        poll_interval: float = 5.0,
        max_backoff: float = 30.0,
        publisher: EventPublisher | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if poll_interval <= 0 or max_backoff <= 0:
            raise ValueError("poll_interval and max_backoff must be positive (seconds)")
        self.settings = settings
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.publisher = publisher or EventPublisher.from_settings(settings, connect_timeout=connect_timeout)
        self._conn: Connection[TupleRow] | None = None
        self._listener: Connection[TupleRow] | None = None

    # -- one batch -------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Publish one batch of unpublished events; returns how many were published (0: none waiting).

        Raises `PublishError` (broker unreachable or a message unconfirmed) or `psycopg.Error`; either
        way the batch's transaction is rolled back, its rows stay unpublished, and the next call
        reconnects whatever broke.
        """
        conn = self._db()
        try:
            with conn.transaction():
                rows = conn.execute(SELECT_BATCH, (self.batch_size,)).fetchall()
                if not rows:
                    return 0
                self.publisher.publish_batch([event_from_row(row) for row in rows])
                conn.execute(MARK_PUBLISHED, ([row[0] for row in rows],))
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._close_db()
            raise
        OUTBOX_PUBLISHED.inc(len(rows))
        log.info("outbox.published", count=len(rows), first_position=rows[0][0], last_position=rows[-1][0])
        return len(rows)

    def count_backlog(self) -> None:
        """How many events wait unpublished, for the metric (an index-only count of the unpublished rows)."""
        conn = self._db()
        with conn.transaction():
            row = conn.execute(COUNT_UNPUBLISHED).fetchone()
        OUTBOX_BACKLOG.set(int(row[0]) if row else 0)

    def prune(self) -> int:
        """Delete events published more than `settings.outbox_retention_s` ago; returns how many."""
        conn = self._db()
        total = 0
        try:
            while True:
                with conn.transaction():
                    deleted = conn.execute(PRUNE_BATCH, (self.settings.outbox_retention_s, PRUNE_BATCH_SIZE)).rowcount
                total += deleted
                if deleted < PRUNE_BATCH_SIZE:
                    break
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._close_db()
            raise
        if total:
            log.info("outbox.pruned", count=total, retention_s=self.settings.outbox_retention_s)
        return total

    def drain(self) -> int:
        """Run batches until one comes back short; returns the total published. Raises like `run_once`."""
        total = 0
        while True:
            published = self.run_once()
            total += published
            if published < self.batch_size:
                return total

    # -- the loop --------------------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        """Publish until `stop` is set: batch after batch while they come back full, then wait for a NOTIFY
        (or `poll_interval`). Failures are logged and retried after a capped, doubling backoff. A batch in
        progress when `stop` is set is finished first. Closes the relay's connections on return."""
        log.info("relay.started", batch_size=self.batch_size, poll_interval=self.poll_interval)
        backoff = 0.0
        failures = 0
        next_prune = next_count = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + PRUNE_INTERVAL
                        self.prune()
                    if time.monotonic() >= next_count:
                        next_count = time.monotonic() + BACKLOG_COUNT_INTERVAL_S
                        self.count_backlog()
                    # LISTEN before reading the table, so no commit falls between the read and the wait.
                    self._listen()
                    published = self.run_once()
                    if failures:
                        log.info("relay.recovered", after_failures=failures)
                    backoff, failures = 0.0, 0
                    if published < self.batch_size:
                        self._wait(stop)
                except Exception as exc:
                    failures += 1
                    backoff = min(self.max_backoff, max(MIN_BACKOFF, backoff * 2))
                    if isinstance(exc, PublishError | psycopg.OperationalError):  # broker or database down
                        log.warning("relay.batch_failed", error=repr(exc), failures=failures, retry_in=backoff)
                    else:
                        log.exception("relay.unexpected_error", failures=failures, retry_in=backoff)
                    self._drop_broken_listener()
                    stop.wait(backoff)
        finally:
            self.close()
            log.info("relay.stopped")

    def _wait(self, stop: threading.Event) -> None:
        """Until a NOTIFY arrives, `poll_interval` passes or `stop` is set; keeps the AMQP link serviced."""
        listener = self._listen()
        deadline = time.monotonic() + self.poll_interval
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return  # fallback poll
            if _notified(listener, timeout=min(remaining, STOP_CHECK_INTERVAL)):
                # Swallow notifications already queued: the next batch sees their commits anyway.
                while _notified(listener, timeout=0):
                    pass
                return
            self.publisher.keepalive()

    # -- connections -----------------------------------------------------------------------------------

    def _db(self) -> Connection[TupleRow]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings, autocommit=False)
        return self._conn

    def _listen(self) -> Connection[TupleRow]:
        if self._listener is None or self._listener.closed:
            self._listener = connect(self.settings, autocommit=True)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self._listener

    def _close_db(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _drop_broken_listener(self) -> None:
        if self._listener is not None and (self._listener.broken or self._listener.closed):
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        """Close the database connections and the broker connection; the relay reopens them on next use."""
        self._close_db()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.publisher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m workers.relay`: relay until SIGTERM or SIGINT, then finish the batch and exit 0."""
    parser = parser_for("relay", "Publish staged outbox events to RabbitMQ.")
    parser.add_argument("--batch-size", type=int, default=500, help="events per transaction (default 500)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        help="seconds to wait for a NOTIFY before polling the outbox anyway (default 5)",
    )
    parser.add_argument(
        "--max-backoff", type=float, default=30.0, help="seconds, cap of the retry backoff (default 30)"
    )
    add_metrics_option(parser)
    args = parser.parse_args(argv)
    settings = settings_or_exit("relay")
    configure_logging(level=settings.log_level, json=settings.log_json)
    serve_metrics_if_asked(args)
    tune_garbage_collector()

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("relay.stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    relay = OutboxRelay(
        settings, batch_size=args.batch_size, poll_interval=args.poll_interval, max_backoff=args.max_backoff
    )
    relay.run_forever(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
