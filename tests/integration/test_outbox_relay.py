"""The outbox relay against real PostgreSQL and RabbitMQ.

Every test taps `ledger.events` with a fresh exclusive queue bound to `#` and looks only at its own tenant's
messages: the database (and so the outbox) is shared with the other tests, whose events the relays here
publish too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pika
import psycopg
import pytest

from core.adapters.rabbitmq import PublishError, declare_events_exchange
from core.application.ports import Event
from core.application.views import OperationStatus
from core.bootstrap import LedgerService
from core.settings import Settings
from tests.helpers import credit, debit, open_account
from tests.processes import settings_env
from workers.relay import NOTIFY_CHANNEL, OutboxRelay

CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:1/%2F"
REPO_ROOT = Path(__file__).resolve().parents[2]

Db = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class Message:
    routing_key: str
    properties: Any  # pika.BasicProperties
    body: dict[str, Any]


class EventTap:
    """An exclusive, auto-delete queue bound to every routing key of the events exchange."""

    def __init__(self, url: str, exchange: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        declare_events_exchange(self.channel, exchange)
        declared = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.queue: str = declared.method.queue
        self.channel.queue_bind(queue=self.queue, exchange=exchange, routing_key="#")

    def take(self, tenant: str, *, expected: int = 0, timeout: float = 5.0) -> list[Message]:
        """The tenant's messages queued so far, waiting up to `timeout` seconds for at least `expected`."""
        found: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is not None:
                if (properties.headers or {}).get("tenant_id") == tenant:
                    found.append(Message(method.routing_key, properties, json.loads(body)))
                continue
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            self.connection.sleep(0.05)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def tap(settings: Settings) -> Iterator[EventTap]:
    events = EventTap(settings.amqp_url, settings.events_exchange)
    try:
        yield events
    finally:
        events.close()


@pytest.fixture
def relay(settings: Settings) -> Iterator[OutboxRelay]:
    with OutboxRelay(settings, batch_size=50, poll_interval=0.5) as outbox_relay:
        yield outbox_relay


def outbox_rows(db: Db, tenant: str) -> list[tuple[UUID, str, datetime | None]]:
    rows = db.execute(
        "SELECT event_id, event_type, published_at FROM outbox WHERE tenant_id = %s ORDER BY position", (tenant,)
    ).fetchall()
    return [(row[0], row[1], row[2]) for row in rows]


def unpublished(db: Db, tenant: str) -> int:
    return sum(1 for _, _, published_at in outbox_rows(db, tenant) if published_at is None)


def run_in_thread(relay: OutboxRelay) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=relay.run_forever, args=(stop,), name="outbox-relay", daemon=True)
    thread.start()
    return thread, stop


def test_relay_publishes_each_staged_event_once(
    ledger: LedgerService, tenant: str, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    a = open_account(ledger, tenant)
    b = open_account(ledger, tenant)
    assert credit(ledger, tenant, a, 1000).status is OperationStatus.SUCCEEDED
    rejected = debit(ledger, tenant, b, 500)  # b is empty and may not overdraw
    assert rejected.status is OperationStatus.FAILED
    assert unpublished(db, tenant) == 4

    while relay.run_once():
        pass
    messages = tap.take(tenant, expected=4)

    assert Counter(m.body["type"] for m in messages) == Counter(
        {"account.created": 2, "transaction.posted": 1, "transaction.rejected": 1}
    )
    ids = [m.body["id"] for m in messages]
    assert len(set(ids)) == len(ids) == 4
    for m in messages:
        assert m.routing_key == m.body["type"] == m.properties.type
        assert m.properties.message_id == m.body["id"]
        assert m.properties.delivery_mode == 2
        assert m.properties.content_type == "application/json"
        assert set(m.properties.headers) == {"tenant_id", "x-outbox-position"}
        assert m.properties.headers["tenant_id"] == tenant
        assert set(m.body) == {"id", "type", "tenant_id", "occurred_at", "data"}
        assert m.body["tenant_id"] == tenant
        datetime.fromisoformat(m.body["occurred_at"])
    created = {m.body["data"]["account"]["id"] for m in messages if m.body["type"] == "account.created"}
    assert created == {str(a), str(b)}
    (problem,) = (m.body["data"]["problem"] for m in messages if m.body["type"] == "transaction.rejected")
    assert problem == rejected.problem

    rows = outbox_rows(db, tenant)
    assert {str(event_id) for event_id, _, _ in rows} == set(ids)
    # Each message names its outbox position: the ledger's commit order, which replay follows.
    by_position = sorted(messages, key=lambda m: m.properties.headers["x-outbox-position"])
    assert [m.body["id"] for m in by_position] == [str(event_id) for event_id, _, _ in rows]
    assert all(published_at is not None for _, _, published_at in rows)

    # Published rows are never picked up again.
    assert relay.drain() == 0
    assert tap.take(tenant, timeout=0.3) == []


def test_prune_deletes_old_published_events_up_to_the_first_one_that_must_stay(
    ledger: LedgerService, tenant: str, relay: OutboxRelay, db: Db, settings: Settings
) -> None:
    for _ in range(3):
        open_account(ledger, tenant)  # an account.created event each
    relay.drain()  # everything staged so far in the shared outbox is published now
    (first, second, third) = (event_id for event_id, _, _ in outbox_rows(db, tenant))
    age = settings.outbox_retention_s + 60

    def position(event_id: UUID) -> int:
        row = db.execute("SELECT position FROM outbox WHERE event_id = %s", (event_id,)).fetchone()
        assert row is not None
        return int(row[0])

    # Everything up to `second` was published long ago, except `first`, which is still waiting.
    db.execute(
        "UPDATE outbox SET published_at = now() - make_interval(secs => %s) WHERE position <= %s",
        (age, position(second)),
    )
    db.execute("UPDATE outbox SET published_at = NULL WHERE event_id = %s", (first,))
    relay.prune()
    assert db.execute("SELECT count(*) FROM outbox WHERE position < %s", (position(first),)).fetchone() == (0,)
    # `first` waits, so nothing after it goes either, however old.
    assert {event_id for event_id, _, _ in outbox_rows(db, tenant)} == {first, second, third}

    db.execute("UPDATE outbox SET published_at = now() - make_interval(secs => %s) WHERE event_id = %s", (age, first))
    assert relay.prune() == 2
    assert {event_id for event_id, _, _ in outbox_rows(db, tenant)} == {third}  # published just now: kept


def test_rolled_back_unit_of_work_emits_nothing(
    ledger: LedgerService, tenant: str, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    now = datetime.now(UTC)
    with ledger.unit_of_work() as uow:
        uow.outbox.stage([Event("test.rolled_back", tenant, {"n": 1}, now)])
        # left without commit(): rolled back
    with ledger.unit_of_work() as uow:
        uow.outbox.stage([Event("test.committed", tenant, {"n": 2}, now)])
        uow.commit()

    assert [event_type for _, event_type, _ in outbox_rows(db, tenant)] == ["test.committed"]
    relay.drain()
    messages = tap.take(tenant, expected=1, timeout=2.0)
    assert [m.body["type"] for m in messages] == ["test.committed"]
    assert messages[0].body["data"] == {"n": 2}
    assert tap.take(tenant, timeout=0.3) == []


def test_a_large_event_among_small_ones_is_staged_and_published_in_its_place(
    ledger: LedgerService, tenant: str, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    """A batch's snapshot goes to PostgreSQL as a parameter of its own; the outbox order stays the staging order."""
    now = datetime.now(UTC)
    large = {"items": [{"n": n, "text": "x" * 40} for n in range(1_000)]}  # 55 KB of JSON
    events = [
        Event("test.small", tenant, {"n": 1}, now),
        Event("test.large", tenant, large, now),
        Event("test.small", tenant, {"n": 3}, now),
        Event("test.small", tenant, {"n": 4}, now),
    ]
    with ledger.unit_of_work() as uow:
        uow.outbox.stage(events)
        uow.commit()

    assert [event_id for event_id, _, _ in outbox_rows(db, tenant)] == [e.id for e in events]
    relay.drain()
    messages = tap.take(tenant, expected=4, timeout=2.0)
    assert [m.body["data"] for m in messages] == [e.payload for e in events]


def test_outbox_insert_notifies_on_commit_only(ledger: LedgerService, tenant: str, settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with ledger.unit_of_work() as uow:
            uow.outbox.stage([Event("test.rolled_back", tenant, {}, datetime.now(UTC))])
        assert list(listener.notifies(timeout=0.5)) == []

        with ledger.unit_of_work() as uow:
            uow.outbox.stage([Event("test.one", tenant, {}, datetime.now(UTC))])
            uow.outbox.stage([Event("test.two", tenant, {}, datetime.now(UTC))])
            uow.commit()
        received = list(listener.notifies(timeout=2.0, stop_after=1))
        assert [n.channel for n in received] == [NOTIFY_CHANNEL]


def test_broker_down_keeps_rows_for_a_later_relay(
    ledger: LedgerService, tenant: str, settings: Settings, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    open_account(ledger, tenant)
    account = open_account(ledger, tenant)
    credit(ledger, tenant, account, 100)

    down = OutboxRelay(settings.replace(amqp_url=CLOSED_PORT_URL), connect_timeout=2.0)
    with down, pytest.raises(PublishError):
        down.run_once()
    assert unpublished(db, tenant) == 3
    assert tap.take(tenant, timeout=0.3) == []

    relay.drain()
    messages = tap.take(tenant, expected=3)
    assert sorted(m.body["type"] for m in messages) == ["account.created", "account.created", "transaction.posted"]
    assert unpublished(db, tenant) == 0


def test_relays_skip_rows_locked_by_another(
    ledger: LedgerService, tenant: str, settings: Settings, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    open_account(ledger, tenant)
    with psycopg.connect(settings.database_url) as other:  # another relay, mid-batch
        other.execute("SELECT 1 FROM outbox WHERE tenant_id = %s FOR UPDATE", (tenant,))
        started = time.monotonic()
        relay.drain()
        assert time.monotonic() - started < 2.0  # skipped, not waited for
        assert unpublished(db, tenant) == 1
        other.rollback()
    relay.drain()
    assert [m.body["type"] for m in tap.take(tenant, expected=1)] == ["account.created"]
    assert unpublished(db, tenant) == 0


def test_relay_reconnects_after_losing_its_database_connection(
    ledger: LedgerService, tenant: str, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    relay.drain()
    assert relay._conn is not None
    db.execute("SELECT pg_terminate_backend(%s)", (relay._conn.info.backend_pid,))
    open_account(ledger, tenant)

    with pytest.raises(psycopg.OperationalError):
        relay.run_once()
    assert unpublished(db, tenant) == 1
    relay.drain()
    assert [m.body["type"] for m in tap.take(tenant, expected=1)] == ["account.created"]


def test_run_forever_is_woken_by_notify(
    ledger: LedgerService, tenant: str, settings: Settings, tap: EventTap, db: Db
) -> None:
    relay = OutboxRelay(settings, batch_size=1000, poll_interval=30.0)
    thread, stop = run_in_thread(relay)
    try:
        account = open_account(ledger, tenant)
        assert [m.body["type"] for m in tap.take(tenant, expected=1, timeout=5.0)] == ["account.created"]
        time.sleep(0.3)  # the relay is idle now, waiting on LISTEN with 30 s to go before it would poll

        started = time.monotonic()
        assert credit(ledger, tenant, account, 100).status is OperationStatus.SUCCEEDED
        messages = tap.take(tenant, expected=1, timeout=5.0)
        assert [m.body["type"] for m in messages] == ["transaction.posted"]
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert unpublished(db, tenant) == 0


def test_run_forever_rides_out_a_broker_outage_and_stops_on_request(
    ledger: LedgerService, tenant: str, settings: Settings, tap: EventTap, relay: OutboxRelay, db: Db
) -> None:
    down = OutboxRelay(settings.replace(amqp_url=CLOSED_PORT_URL), poll_interval=0.2, max_backoff=0.5)
    thread, stop = run_in_thread(down)
    open_account(ledger, tenant)
    time.sleep(1.5)  # several failed batches, each rolled back
    assert thread.is_alive()
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert unpublished(db, tenant) == 1

    relay.drain()
    assert [m.body["type"] for m in tap.take(tenant, expected=1)] == ["account.created"]


def test_relay_process_publishes_and_stops_on_sigterm(
    ledger: LedgerService, tenant: str, settings: Settings, tap: EventTap, db: Db
) -> None:
    # Every setting of the run (its events exchange and subscriber queues are private), logging at INFO.
    env = {**settings_env(settings), "CLEANLEDGER_LOG_LEVEL": "INFO"}
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.relay", "--poll-interval", "30"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        open_account(ledger, tenant)
        assert [m.body["type"] for m in tap.take(tenant, expected=1, timeout=10.0)] == ["account.created"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10.0)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    log_events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "relay.stop_requested" in log_events
    assert log_events[-1] == "relay.stopped"
    assert unpublished(db, tenant) == 0
