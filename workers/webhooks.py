"""The webhook worker: turns ledger events into deliveries and delivers them (`python -m workers.webhooks`).

Fan-out (a thread, pika): a durable queue (`CLEANLEDGER_WEBHOOK_QUEUE`) bound to every routing key of
`ledger.events`. Each batch of events becomes, in one statement and one commit, a delivery per live endpoint of
the event's tenant subscribed to its type; only then is the batch acknowledged (one multiple-ack). An event seen
twice meets the unique (endpoint, event) and adds nothing, so at-least-once events give exactly one delivery.

Delivery (the asyncio event loop, psycopg's async pool, aiohttp): a new delivery is leased to the worker that
created it and handed to its delivery loop in memory, so a first attempt costs no claim (the leases of those
still waiting are renewed in one statement every LEASE_RENEW_S). Due deliveries (retries, released or expired
leases) are claimed with `FOR UPDATE SKIP LOCKED` and leased, so several workers share the work without
sending one twice; a worker looks for them when told (NOTIFY), after a claim that found some, and every
`CLEANLEDGER_WEBHOOK_POLL_S`, not after every attempt. Each attempt is signed, sent with a timeout
(`CLEANLEDGER_WEBHOOK_TIMEOUT_S`), and recorded with its status, latency and error; the outcomes of attempts
that end together are recorded in one statement.
A non-2xx answer, a timeout or a connection error is retried after a capped exponential backoff with full
jitter until the delivery's retry window (`CLEANLEDGER_WEBHOOK_RETRY_WINDOW_S`) is spent; then it is marked
failed and kept. At most `CLEANLEDGER_WEBHOOK_CONCURRENCY` attempts are in flight, and at most
`CLEANLEDGER_WEBHOOK_ENDPOINT_CONCURRENCY` to any one endpoint: a slow or dead receiver holds a few slots of its
own and never the others' deliveries. Postings never wait on any of this: they only stage events in the outbox.

SIGTERM/SIGINT: stop taking work, let the attempts in flight finish (or their leases run out), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pika
import pika.exceptions
import psycopg
import structlog
from psycopg import Connection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from core.adapters import json_text
from core.adapters.http.webhooks import Outgoing, WebhookSender
from core.adapters.metrics import WEBHOOK_ATTEMPT_SECONDS, WEBHOOK_ATTEMPTS
from core.adapters.postgres.db import connect
from core.adapters.postgres.webhook_worker import (
    Attempted,
    Due,
    EventMessage,
    claim_due,
    fan_out,
    listen,
    open_async_pool,
    record_attempts,
    release,
    renew_leases,
)
from core.adapters.rabbitmq.connection import connection_parameters
from core.adapters.rabbitmq.events import declare_subscriber_queue
from core.application.grouping import GroupWriter
from core.application.webhooks import after_attempt
from core.domain.webhooks import parse_networks
from core.entrypoint import start
from core.settings import Settings

log = structlog.get_logger("webhooks")
FAN_OUT_BATCH = 500  # events per fan-out statement at most (and the queue's prefetch)
FAN_OUT_WAIT_S = 0.02  # after a first event, how long to wait for more to join its batch, seconds
IDLE_POLL_S = 0.5  # how often an idle fan-out looks at its stop flag, seconds
RECONNECT_FIRST_S = 0.2
RECONNECT_CAP_S = 5.0
LEASE_MARGIN_S = 60.0  # a claimed delivery is due again this long after its attempt's timeout (worker died)
# Deliveries handed over by the fan-out that may wait here, all endpoints together; beyond it they are released
# to the claim path. Their leases are renewed while they wait, every LEASE_RENEW_S seconds.
QUEUED_MAX = 50_000
LEASE_RENEW_S = 20.0
RECORD_GROUP_MAX = 256  # attempts' outcomes recorded in one statement at most


def event_message(properties: Any, body: bytes) -> EventMessage:
    """What the fan-out needs of an event, from the message's properties as the relay sets them (message id,
    type, tenant header): its body is parsed only if it goes to an endpoint. A message without them (not the
    relay's) is read from its body. ValueError, KeyError or TypeError: not an event."""
    tenant = (properties.headers or {}).get("tenant_id")
    if properties.message_id and isinstance(properties.type, str) and isinstance(tenant, str):
        return EventMessage(UUID(properties.message_id), properties.type, tenant, body)
    document = json_text.loads(body)
    if not isinstance(document, dict):
        raise ValueError("not an object")
    if not all(isinstance(document.get(k), str) for k in ("type", "tenant_id")):
        raise ValueError("type and tenant_id must be strings")
    return EventMessage(UUID(str(document["id"])), document["type"], document["tenant_id"], body)


class EventFanout:
    """Consumes the webhook queue on its own thread (pika is blocking) and inserts deliveries."""

    def __init__(self, settings: Settings, *, lease_s: float, on_created: Callable[[list[Due]], object]) -> None:
        """lease_s: how long a new delivery is leased to this worker, seconds. on_created: gets the new
        deliveries (leased), to attempt them."""
        self.settings = settings
        self.lease_s = lease_s
        self.on_created = on_created
        self.stopping = threading.Event()
        self._params = connection_parameters(settings.amqp_url)
        self._connection: Any = None
        self._channel: Any = None
        self._db: Connection[TupleRow] | None = None
        self._received: list[tuple[int, Any, bytes]] = []

    def _open(self) -> None:
        self._connection = pika.BlockingConnection(self._params)
        self._channel = self._connection.channel()
        queue = self.settings.webhook_queue
        # The exchange and the queue; the relay declares them too.
        declare_subscriber_queue(self._channel, queue, self.settings.events_exchange)
        self._channel.basic_qos(prefetch_count=FAN_OUT_BATCH)
        self._channel.basic_consume(queue=queue, on_message_callback=self._on_message)
        log.info("webhooks.fanout_consuming", queue=queue)

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._received.append((method.delivery_tag, properties, body))

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                connection.close()
        self._received.clear()  # unacknowledged: RabbitMQ gives them to a consumer again

    def _database(self) -> Connection[TupleRow]:
        if self._db is None or self._db.closed or self._db.broken:
            self._db = connect(self.settings, autocommit=False)
        return self._db

    def next_batch(self) -> list[tuple[int, Any, bytes]]:
        """Waits up to IDLE_POLL_S for a first event, then briefly for company."""
        self._received.clear()
        self._connection.process_data_events(time_limit=IDLE_POLL_S)
        while self._received and len(self._received) < FAN_OUT_BATCH:
            before = len(self._received)
            self._connection.process_data_events(time_limit=FAN_OUT_WAIT_S)
            if len(self._received) == before:
                break
        return list(self._received)

    def run(self) -> None:
        backoff = RECONNECT_FIRST_S
        while not self.stopping.is_set():
            try:
                if self._connection is None or not self._connection.is_open:
                    self._open()
                batch = self.next_batch()
                if batch:
                    self.handle(batch)
                backoff = RECONNECT_FIRST_S
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("webhooks.broker_unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=backoff)
                self._close()
                self.stopping.wait(backoff)
                backoff = min(RECONNECT_CAP_S, backoff * 2)
            except Exception:
                log.exception("webhooks.fanout_crashed", retry_in_s=backoff)
                self._close()
                self.stopping.wait(backoff)
                backoff = min(RECONNECT_CAP_S, backoff * 2)
        self._close()
        if self._db is not None:
            self._db.close()

    def handle(self, batch: list[tuple[int, Any, bytes]]) -> None:
        events: dict[UUID, EventMessage] = {}
        for tag, properties, body in batch:
            try:
                event = event_message(properties, body)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("webhooks.event_invalid", tag=tag, error=str(exc))  # acknowledged with the batch: dropped
                continue
            events[event.id] = event
        backoff = RECONNECT_FIRST_S
        created: list[Due] = []
        while events:
            try:
                created = fan_out(
                    self._database(),
                    list(events.values()),
                    retry_window_s=self.settings.webhook_retry_window_s,
                    lease_s=self.lease_s,
                )
                break
            except psycopg.OperationalError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("webhooks.database_unavailable", error=type(exc).__name__, retry_in_s=backoff)
                if self._db is not None and (self._db.broken or self._db.closed):
                    self._db = None
                self._connection.sleep(backoff)  # keeps the AMQP link serviced
                backoff = min(RECONNECT_CAP_S, backoff * 2)
        self._channel.basic_ack(delivery_tag=batch[-1][0], multiple=True)
        if created:
            log.info("webhooks.deliveries_created", events=len(events), deliveries=len(created))
            self.on_created(created)

    def stop(self) -> None:
        self.stopping.set()


class WebhookDispatcher:
    """Attempts deliveries within the global and per-endpoint concurrency limits: first the ones this worker's
    fan-out just created (handed over in memory, leased to it already), then due ones claimed from PostgreSQL
    (retries, and what another worker left). Outcomes are recorded in groups, one statement each."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool, sender: WebhookSender) -> None:
        self.settings = settings
        self.pool = pool
        self.sender = sender
        self.wake = asyncio.Event()
        self.in_flight: dict[UUID, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        # Handed over by the fan-out, per endpoint, oldest first, with when their lease runs out.
        self.queued: dict[UUID, deque[tuple[Due, float]]] = {}
        self.queued_count = 0
        self.recorder: GroupWriter[Attempted, None] = GroupWriter(self._record, max_group=RECORD_GROUP_MAX, writers=1)
        # Whether PostgreSQL may hold deliveries due for this worker: set by a NOTIFY, a release, a claim that
        # found some (there may be more) and every `webhook_poll_s`; cleared by a claim that found none. A
        # finished attempt wakes the loop for the deliveries handed over in memory, and costs no claim.
        self.look_for_due = True
        self.looked_at = 0.0

    @property
    def busy(self) -> int:
        return sum(self.in_flight.values())

    def hand_off(self, created: list[Due]) -> None:
        """New deliveries from the fan-out (on the event loop's thread), leased to this worker: attempted here in
        their turn. Beyond QUEUED_MAX waiting, they are released to the claim path instead."""
        spilled: list[UUID] = []
        lease_ends = time.monotonic() + self.lease_s
        for due in created:
            if self.queued_count >= QUEUED_MAX:
                spilled.append(due.id)
                continue
            self.queued.setdefault(due.endpoint_id, deque()).append((due, lease_ends))
            self.queued_count += 1
        if spilled:
            self._spawn(self._release(spilled))
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop))
        backoff = RECONNECT_FIRST_S
        log.info("webhooks.delivering", concurrency=self.settings.webhook_concurrency)
        renewed_at = time.monotonic()
        try:
            while not stop.is_set():
                self.wake.clear()
                self._start_queued()
                if self.queued and time.monotonic() - renewed_at > LEASE_RENEW_S:
                    renewed_at = time.monotonic()
                    await self._renew_leases()
                free = self.settings.webhook_concurrency - self.busy
                claimed: list[Due] = []
                if time.monotonic() - self.looked_at >= self.settings.webhook_poll_s:
                    self.look_for_due = True  # retries come due with time, and other workers' leases run out
                if free > 0 and self.look_for_due:
                    per_endpoint = self.settings.webhook_endpoint_concurrency
                    # Endpoints with no room, or with deliveries of their own waiting here, are not claimed for.
                    full = [e for e, n in self.in_flight.items() if n >= per_endpoint] + list(self.queued)
                    room = {e: per_endpoint - n for e, n in self.in_flight.items() if n < per_endpoint}
                    try:
                        claimed = await claim_due(
                            self.pool,
                            busy=full,
                            room=room,
                            default_room=per_endpoint,
                            limit=free,
                            lease_s=self.lease_s,
                        )
                        self.look_for_due, self.looked_at = bool(claimed), time.monotonic()
                        backoff = RECONNECT_FIRST_S
                    except psycopg.Error as exc:
                        log.warning("webhooks.claim_failed", error=type(exc).__name__, retry_in_s=backoff)
                        await _sleep_until(stop, backoff)
                        backoff = min(RECONNECT_CAP_S, backoff * 2)
                        continue
                for due in claimed:
                    self._start(due)
                if claimed and len(claimed) == free:
                    await asyncio.sleep(0)
                    continue  # there may be more due: as soon as slots free up (a finished attempt wakes us)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=self.settings.webhook_poll_s)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            left = [due.id for waiting in self.queued.values() for due, _ in waiting]
            self.queued.clear()
            self.queued_count = 0
            if left:  # not attempted here: due for whoever claims next, not after the lease
                self._spawn(self._release(left))
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=self.settings.webhook_timeout_s + 5)
            await self.recorder.close()

    def _start_queued(self) -> None:
        """Start the handed-over deliveries there is room for, oldest first per endpoint."""
        per_endpoint = self.settings.webhook_endpoint_concurrency
        for endpoint_id in list(self.queued):
            waiting = self.queued[endpoint_id]
            while waiting and self.busy < self.settings.webhook_concurrency:
                if self.in_flight.get(endpoint_id, 0) >= per_endpoint:
                    break
                due, lease_ends = waiting.popleft()
                self.queued_count -= 1
                if lease_ends - time.monotonic() > self.settings.webhook_timeout_s:
                    self._start(due)
                # else its lease ends before the attempt could: the claim path has it, or soon will
            if not waiting:
                del self.queued[endpoint_id]

    async def _renew_leases(self) -> None:
        """Extend the leases of the deliveries waiting here (one statement), so no other worker takes them."""
        waiting = [due.id for queue in self.queued.values() for due, _ in queue]
        try:
            await renew_leases(self.pool, waiting, lease_s=self.lease_s)
        except psycopg.Error as exc:
            log.warning("webhooks.renew_failed", deliveries=len(waiting), error=type(exc).__name__)
            return
        lease_ends = time.monotonic() + self.lease_s
        for endpoint_id, queue in self.queued.items():
            self.queued[endpoint_id] = deque((due, lease_ends) for due, _ in queue)

    def _start(self, due: Due) -> None:
        self.in_flight[due.endpoint_id] = self.in_flight.get(due.endpoint_id, 0) + 1
        self._spawn(self._attempt(due))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _release(self, delivery_ids: list[UUID]) -> None:
        try:
            await release(self.pool, delivery_ids)
            self.look_for_due = True
            self.wake.set()
        except psycopg.Error as exc:  # their lease runs out instead: attempted a minute later
            log.warning("webhooks.release_failed", deliveries=len(delivery_ids), error=type(exc).__name__)

    async def _attempt(self, due: Due) -> None:
        try:
            attempted_at = datetime.now(UTC)
            result = await self.sender.send(Outgoing(due.id, due.url, due.event_type, due.body.encode(), due.secret))
            step = after_attempt(
                result,
                attempts=due.attempts + 1,
                now=datetime.now(UTC),
                expires_at=due.expires_at,
                base_s=self.settings.webhook_backoff_min_s,
                cap_s=self.settings.webhook_backoff_max_s,
            )
            WEBHOOK_ATTEMPTS.labels("retry" if step.status == "pending" else step.status).inc()
            WEBHOOK_ATTEMPT_SECONDS.observe(result.latency_ms / 1000)
            log.info(
                "webhooks.attempt",
                delivery_id=str(due.id),
                endpoint_id=str(due.endpoint_id),
                event_type=due.event_type,
                attempt=due.attempts + 1,
                status_code=result.status_code,
                latency_ms=result.latency_ms,
                error=result.error,
                outcome=step.status,
                next_attempt_at=step.next_attempt_at.isoformat() if step.next_attempt_at else None,
            )
            await self.recorder.submit(Attempted(due, result, step, attempted_at))
        except Exception:
            log.exception("webhooks.attempt_crashed", delivery_id=str(due.id))
        finally:
            left = self.in_flight.get(due.endpoint_id, 1) - 1
            if left > 0:
                self.in_flight[due.endpoint_id] = left
            else:
                self.in_flight.pop(due.endpoint_id, None)
            self.wake.set()

    async def _record(self, attempts: Sequence[Attempted]) -> list[BaseException | None]:
        for wait_s in (0.2, 1.0, 5.0, None):
            try:
                await record_attempts(self.pool, attempts)
                break
            except psycopg.Error as exc:
                # Not recorded: the leases run out and the deliveries are attempted again (at least once).
                log.warning("webhooks.record_failed", deliveries=len(attempts), error=type(exc).__name__)
                if wait_s is None:
                    break
                await asyncio.sleep(wait_s)
        return [None] * len(attempts)

    async def _listen(self, stop: asyncio.Event) -> None:
        """Wake on NOTIFY (deliveries created by another worker's fan-out, or resent by a tenant)."""
        while not stop.is_set():
            try:
                conn = await listen(self.settings)
                async with conn:
                    async for _ in conn.notifies():
                        self.look_for_due = True
                        self.wake.set()
            except psycopg.Error as exc:
                log.info("webhooks.listen_failed", error=type(exc).__name__)
                await _sleep_until(stop, 1.0)


async def _sleep_until(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    pool = await open_async_pool(settings, max_size=4)
    sender = WebhookSender(
        timeout_s=settings.webhook_timeout_s,
        allowed=parse_networks(settings.webhook_allowed_networks),
        max_connections=settings.webhook_concurrency,
    )
    dispatcher = WebhookDispatcher(settings, pool, sender)
    loop = asyncio.get_running_loop()
    fanout = EventFanout(
        settings,
        lease_s=dispatcher.lease_s,
        on_created=lambda created: loop.call_soon_threadsafe(dispatcher.hand_off, created),
    )
    thread = threading.Thread(target=fanout.run, name="webhook-fanout", daemon=True)
    thread.start()
    try:
        await dispatcher.run(stop)
    finally:
        fanout.stop()
        await asyncio.to_thread(thread.join, 10.0)
        await sender.close()
        await pool.close()


def main() -> int:
    settings = start("webhooks", "Webhook worker: turns ledger events into signed deliveries and delivers them.")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    started = time.monotonic()
    asyncio.run(run())
    log.info("webhooks.stopped", ran_s=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
