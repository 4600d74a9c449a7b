"""The audit trail on a real Mongo-wire server (SecantusDB): every ledger event reaches it exactly once, through
the outbox, the relay and RabbitMQ, across a crash of its consumer and an outage of the store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import psycopg
import pymongo
import pytest
from aiohttp.test_utils import TestClient

from core.adapters.mongo.audit import COLLECTION, LARGE_DOCUMENT_CHARS
from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.webhook_worker import EventMessage, fan_out
from core.adapters.rabbitmq.trail import AmqpRequestTrail
from core.application.commands import Batch, CaptureHold, CreateAccount, CreateHold, Credit, Debit, Transfer
from core.application.ports import ReceivedRequest
from core.application.webhooks import EventFilter
from core.bootstrap import LedgerService, bootstrap
from core.cli import main as cli_main
from core.domain.money import Money
from core.settings import Settings
from ingress.app import init_app
from tests.helpers import key, open_account
from tests.processes import BIN, ManagedProcess, free_port, settings_env, wait_for_port
from tests.services import delete_queues, postgres_admin_url, private_queues
from workers.redeliver import HoldExpiry

WAIT_S = 60.0  # generous bound on steps that take a second or two


class MongoServer:
    """A SecantusDB server process persisting to its own directory; stopped and started again at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.storage = Path(tempfile.mkdtemp(prefix="cleanledger-mongo-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/cleanledger"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "secantusd-py"), "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", str(self.storage), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, 30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture(scope="module")
def mongo() -> Iterator[MongoServer]:
    server = MongoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def audited(settings: Settings, mongo: MongoServer) -> Iterator[Settings]:
    """Settings for an audit consumer of its own (private queue) writing to the test's Mongo server, with the
    outbox relay running."""
    own = private_queues(settings, f"audit{key()[:8]}", mongo_url=mongo.url)
    try:
        with relay(own, "audit-relay"):
            yield own
    finally:
        delete_queues(own)


def audit_consumer(settings: Settings, name: str) -> contextlib.AbstractContextManager[ManagedProcess]:
    return ManagedProcess.start([str(BIN / "python"), "-m", "workers.audit"], env=settings_env(settings), name=name)


def relay(settings: Settings, name: str) -> contextlib.AbstractContextManager[ManagedProcess]:
    command = [str(BIN / "python"), "-m", "workers.relay", "--poll-interval", "0.5"]
    return ManagedProcess.start(command, env=settings_env(settings), name=name)


def in_environment(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """`settings` as this process's CLEANLEDGER_* variables, for the CLI commands a test runs in-process."""
    for name, value in settings_env(settings).items():
        if name.startswith("CLEANLEDGER_"):
            monkeypatch.setenv(name, value)


def records(mongo_url: str, tenant: str) -> list[dict[str, object]]:
    with pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
        return list(client.get_default_database()[COLLECTION].find({"tenant_id": tenant}))


def outbox_ids(settings: Settings, tenant: str) -> set[str]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT event_id::text FROM outbox WHERE tenant_id = %s", (tenant,)).fetchall()
    return {row[0] for row in rows}


def wait_for_records(mongo_url: str, tenant: str, expected: set[str]) -> list[dict[str, object]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = records(mongo_url, tenant)
        if {str(r["_id"]) for r in found} >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def post_some(ledger: LedgerService, tenant: str, accounts: list[object], n: int) -> None:
    items = [
        (Credit(tenant, accounts[i % len(accounts)], Money.for_posting(100 + i, "USD")), key())  # type: ignore[arg-type]
        for i in range(n)
    ]
    items += [(Transfer(tenant, accounts[0], accounts[1], Money.for_posting(10**9, "USD")), key())]  # type: ignore[arg-type]  # refused
    ledger.execute_many(items)


def test_every_event_reaches_the_audit_store_once_across_a_consumer_crash(
    audited: Settings, mongo: MongoServer, ledger: LedgerService, tenant: str
) -> None:
    accounts: list[object] = [open_account(ledger, tenant) for _ in range(3)]
    with audit_consumer(audited, "audit-1") as first:
        post_some(ledger, tenant, accounts, 50)
        wait_for_records(mongo.url, tenant, outbox_ids(audited, tenant))
        post_some(ledger, tenant, accounts, 200)
        first.kill()  # SIGKILL, whatever it was doing
    post_some(ledger, tenant, accounts, 50)  # the ledger goes on while nobody audits
    expected = outbox_ids(audited, tenant)
    with audit_consumer(audited, "audit-2"):
        found = wait_for_records(mongo.url, tenant, expected)
    assert {str(r["_id"]) for r in found} == expected  # every event, none twice (the id is the key)
    assert len(found) == len(expected)
    posted = [r for r in found if r["kind"] == "transaction.posted"]
    rejected = [r for r in found if r["kind"] == "transaction.rejected"]
    assert (len(posted), len(rejected)) == (300, 3)
    # A snapshot links to its operation and request, and holds the entries and the balances they left.
    snapshot = posted[0]
    document = snapshot["document"]
    assert isinstance(document, dict)
    assert snapshot["operation_id"] == document["operation_id"] and snapshot["idempotency_key"]
    assert document["request"]["type"] == "credit"
    assert len(document["transaction"]["entries"]) == 2
    assert document["accounts"][0]["balance"]["posted"] > 0
    assert rejected[0]["document"]["problem"]["code"] == "insufficient-funds"  # type: ignore[index]


def test_an_audit_store_outage_delays_records_and_loses_none(
    audited: Settings, mongo: MongoServer, ledger: LedgerService, tenant: str
) -> None:
    accounts: list[object] = [open_account(ledger, tenant) for _ in range(2)]
    with audit_consumer(audited, "audit-outage"):
        mongo.stop()
        try:
            started = time.monotonic()
            post_some(ledger, tenant, accounts, 100)
            assert time.monotonic() - started < 10, "a posting waited for the audit store"
            time.sleep(2)  # the consumer meets the outage and keeps the events in its queue
        finally:
            mongo.start()  # same port, same storage
        expected = outbox_ids(audited, tenant)
        found = wait_for_records(mongo.url, tenant, expected)
    assert {str(r["_id"]) for r in found} == expected
    assert len(found) == len(expected)


async def test_an_operation_s_audit_records_are_served_to_its_tenant_only(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    audited: Settings,
    mongo: MongoServer,
    ledger: LedgerService,
    tenant: str,
) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    ledger.execute(Credit(tenant, a, Money.for_posting(500, "USD")), idempotency_key="audit-credit")
    posted = ledger.execute(Transfer(tenant, a, b, Money.for_posting(200, "USD")), idempotency_key="audit-move")
    mine = create_api_key(ledger.pool, tenant)[1]
    theirs = create_api_key(ledger.pool, f"{tenant}-other")[1]
    with audit_consumer(audited, "audit-api"):
        wait_for_records(mongo.url, tenant, outbox_ids(audited, tenant))
    node = await aiohttp_client(init_app(audited))
    path = f"/v1/operations/{posted.operation_id}/audit"
    response = await node.get(path, headers={"Authorization": f"Bearer {mine}"})
    assert response.status == 200
    body = await response.json()
    [record] = body["data"]
    assert (record["kind"], record["idempotency_key"]) == ("transaction.posted", "audit-move")
    assert record["document"]["request"]["type"] == "transfer"
    assert {x["id"]: x["balance"]["posted"] for x in record["document"]["accounts"]} == {str(a): 300, str(b): 200}
    # Another tenant: indistinguishable from an operation that does not exist.
    other = await node.get(path, headers={"Authorization": f"Bearer {theirs}"})
    assert other.status == 404
    assert (await other.json())["code"] == "operation-not-found"
    # The store down: a problem to retry, not a 500, and the ledger's own routes carry on.
    mongo.stop()
    try:
        down = await node.get(path, headers={"Authorization": f"Bearer {mine}"})
        assert (down.status, (await down.json())["code"]) == (503, "service-unavailable")
        alive = await node.get(f"/v1/operations/{posted.operation_id}", headers={"Authorization": f"Bearer {mine}"})
        assert alive.status == 200
    finally:
        mongo.start()


def test_audit_lag_says_how_far_the_trail_is_behind(
    audited: Settings, mongo: MongoServer, ledger: LedgerService, tenant: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    in_environment(monkeypatch, audited)
    account = open_account(ledger, tenant)
    with audit_consumer(audited, "audit-lag"):
        wait_for_records(mongo.url, tenant, outbox_ids(audited, tenant))
    assert cli_main(["audit-lag"]) == 0
    assert "behind by" in capsys.readouterr().out
    post_some(ledger, tenant, [account, open_account(ledger, tenant)], 5)  # nobody audits these yet
    time.sleep(2)  # the relay publishes them into the audit queue
    assert cli_main(["audit-lag"]) == 0
    out = capsys.readouterr().out
    waiting = int(out.split(" in the outbox, ")[1].split(" in ")[0])
    assert waiting >= 6, out
    mongo.stop()
    try:
        assert cli_main(["audit-lag"]) == 1
    finally:
        mongo.start()


def test_replaying_the_trail_into_an_empty_database_reproduces_every_outcome_and_balance(
    settings: Settings, mongo: MongoServer, ledger: LedgerService, tenant: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    own = private_queues(settings, f"replay{key()[:8]}", mongo_url=f"{mongo.url}_replay_{key()[:8]}")
    in_environment(monkeypatch, own)
    try:
        with relay(own, "replay-relay"), audit_consumer(own, "replay-audit"):
            accounts: list[object] = [open_account(ledger, tenant, overdraft=n * 100) for n in range(4)]
            post_some(ledger, tenant, accounts, 120)  # credits, and a transfer refused for funds
            chosen = uuid.uuid4()
            usd = lambda amount: Money.for_posting(amount, "USD")  # noqa: E731
            batch = Batch(
                tenant,
                (
                    CreateAccount(tenant, "USD"),  # an id the ledger picks: replay must give it the same
                    CreateAccount(tenant, "USD", account_id=chosen),
                    Credit(tenant, chosen, usd(500)),
                    Transfer(tenant, chosen, accounts[0], usd(200)),  # type: ignore[arg-type]
                    Debit(tenant, chosen, usd(10_000)),  # refused for funds
                ),
            )
            assert ledger.execute(batch, idempotency_key=key()).status == "succeeded"
            # A batch large enough that its records are kept as JSON text (LARGE_DOCUMENT_CHARS); replay reads
            # them the same. Some of its transfers are refused for funds: the order inside it decides which.
            transfers = tuple(
                Transfer(tenant, accounts[i % 4], accounts[(i + 3) % 4], usd(10**9 if i % 50 == 49 else 11 * i + 5))  # type: ignore[arg-type]
                for i in range(300)
            )
            large = ledger.execute(Batch(tenant, transfers), idempotency_key=key())
            assert {item["status"] for item in large.result["items"]} == {"succeeded", "failed"}  # type: ignore[index]
            # Holds with a short expiry: one captured in time, one let expire. Replayed long after, each still
            # settles as it did, at the time it did.
            soon = datetime.now(UTC) + timedelta(seconds=1)
            holds = [
                ledger.execute(CreateHold(tenant, accounts[1], accounts[2], usd(10), soon), idempotency_key=key())  # type: ignore[arg-type]
                for _ in range(2)
            ]
            captured = ledger.execute(
                CaptureHold(tenant, uuid.UUID(holds[0].result["hold"]["id"])), idempotency_key=key()
            )  # type: ignore[index]
            assert captured.status == "succeeded"
            time.sleep(1.1)
            assert HoldExpiry(ledger).run_once() >= 1
            items = [
                (Transfer(tenant, accounts[i % 4], accounts[(i + 1) % 4], Money.for_posting(37 * i + 1, "USD")), key())
                for i in range(150)
            ]  # some of them refused: the order decides which
            ledger.execute_many(items)  # type: ignore[arg-type]
            ledger.execute_many(items[:20])  # replays: nothing new
            wait_for_records(own.mongo_url, tenant, outbox_ids(own, tenant))
        with pymongo.MongoClient(own.mongo_url, serverSelectionTimeoutMS=5000) as client:
            stored = client.get_default_database()[COLLECTION].find_one({"operation_id": str(large.operation_id)})
            assert stored is not None and "document" not in stored
            assert len(stored["document_json"]) > LARGE_DOCUMENT_CHARS
        with fresh_database() as target:
            assert cli_main(["replay", "--into", target]) == 0, capsys.readouterr().out
            assert "every outcome and balance matches" in capsys.readouterr().out
        # A trail that lies is caught: one balance changed in one snapshot.
        with pymongo.MongoClient(own.mongo_url, serverSelectionTimeoutMS=5000) as client:
            collection = client.get_default_database()[COLLECTION]
            posted = collection.find_one({"tenant_id": tenant, "kind": "transaction.posted"}, sort=[("position", -1)])
            assert posted is not None
            collection.update_one({"_id": posted["_id"]}, {"$inc": {"document.transaction.entries.0.balance_after": 1}})
        with fresh_database() as target:
            assert cli_main(["replay", "--into", target]) == 1
            assert "MISMATCH" in capsys.readouterr().out
    finally:
        delete_queues(own)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    name = f"cleanledger_replay_{key()[:12]}"
    with postgres_admin_url() as admin, psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield psycopg.conninfo.make_conninfo(admin, dbname=name)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def request_records(mongo_url: str, query: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The request records matching `query`, once there are `count` of them (or whatever there is by then)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        with pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
            found = list(client.get_default_database()[COLLECTION].find({"kind": "request.received", **query}))
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["occurred_at"])
        time.sleep(0.2)


async def test_every_mutating_request_is_in_the_trail_as_received_with_its_answer_and_no_secret(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    audited: Settings,
    mongo: MongoServer,
    ledger: LedgerService,
    tenant: str,
) -> None:
    own = audited.replace(webhook_allowed_networks="127.0.0.0/8")
    api_key, secret = create_api_key(ledger.pool, tenant)
    auth = {"Authorization": f"Bearer {secret}"}
    node = await aiohttp_client(init_app(own, node="node-under-test:1"))
    with (
        ManagedProcess.start([str(BIN / "python"), "-m", "workers.consumer"], env=settings_env(own), name="trail-w"),
        audit_consumer(own, "audit-requests"),
    ):
        accepted = await node.post(
            "/v1/accounts?source=test",
            json={"currency": "USD", "metadata": {"note": f"my key is {secret}"}},
            headers={**auth, "Idempotency-Key": "trail-open", "Prefer": "wait=10", "X-Request-ID": "trail-1"},
        )
        assert accepted.status == 201, await accepted.text()
        operation = await accepted.json()
        refused = await node.post(
            "/v1/credits", data=b'{"amount": -5, "currency": "USD"}',
            headers={**auth, "Idempotency-Key": "trail-bad", "Content-Type": "application/json"},
        )  # fmt: skip
        assert refused.status == 422
        anonymous = await node.post(
            "/v1/accounts", json={"currency": "USD"}, headers={"Authorization": f"Basic {secret}"}
        )
        assert anonymous.status == 401
        hook = await node.post(
            "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}, headers=auth
        )
        assert hook.status == 201
        hook_secret = (await hook.json())["secret"]
        assert (await node.get("/v1/accounts", headers=auth)).status == 200  # reads are not recorded
        mine = request_records(own.mongo_url, {"tenant_id": tenant}, 3)
        assert [(r["document"]["method"], r["document"]["path"], r["document"]["status"]) for r in mine] == [
            ("POST", "/v1/accounts", 201),
            ("POST", "/v1/credits", 422),
            ("POST", "/v1/webhook-endpoints", 201),
        ]
        opened, bad, registered = (r["document"] for r in mine)
        # As received: the body, query and headers the client sent, credentials and secrets cut out.
        assert opened["query"] == "source=test"
        assert opened["headers"]["authorization"] == "[redacted]"
        assert opened["headers"]["x-request-id"] == opened["request_id"] == "trail-1"
        assert opened["headers"]["prefer"] == "wait=10"
        assert json.loads(opened["body"])["metadata"]["note"] == "my key is clk_[redacted]"
        assert (opened["api_key_id"], opened["node"]) == (str(api_key.id), "node-under-test:1")
        # The answer given, linked to its operation; the problem of a refused one.
        assert opened["answer"]["id"] == operation["id"] == mine[0]["operation_id"]
        assert mine[0]["idempotency_key"] == "trail-open"
        assert bad["body"] == '{"amount": -5, "currency": "USD"}'
        assert bad["answer"]["code"] == "validation-failed" and mine[1]["operation_id"] is None
        assert registered["answer"]["secret"] == "whsec_[redacted]"
        # Refused before its API key was known: recorded without a tenant.
        [unknown] = request_records(own.mongo_url, {"tenant_id": None, "document.headers.authorization": "[redacted]",
                                                    "occurred_at": {"$gte": mine[0]["occurred_at"]}}, 1)  # fmt: skip
        assert (unknown["document"]["status"], unknown["document"]["body"]) == (401, None)
        # The operation's audit: its raw request beside its snapshot.
        audit_path = f"/v1/operations/{operation['id']}/audit"
        deadline = time.monotonic() + WAIT_S
        while True:
            served = (await (await node.get(audit_path, headers=auth)).json())["data"]
            kinds = sorted(r["kind"] for r in served)
            if kinds == ["account.created", "request.received"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert kinds == ["account.created", "request.received"]
        # A batch large enough that its request record and snapshot are stored as JSON text
        # (LARGE_DOCUMENT_CHARS): the audit route gives them back as documents, secrets still cut out.
        items = [
            {"type": "create_account", "currency": "USD", "metadata": {"n": str(n), "k": secret}} for n in range(300)
        ]
        batch = await node.post(
            "/v1/batches",
            json={"items": items},
            headers={**auth, "Idempotency-Key": "trail-batch", "Prefer": "wait=10"},
        )
        assert batch.status == 201, await batch.text()
        batch_id = (await batch.json())["id"]
        deadline = time.monotonic() + WAIT_S
        while True:
            served = (await (await node.get(f"/v1/operations/{batch_id}/audit", headers=auth)).json())["data"]
            if len(served) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        by_kind = {r["kind"]: r["document"] for r in served}
        assert sorted(by_kind) == ["batch.settled", "request.received"]
        assert [i["status"] for i in by_kind["batch.settled"]["items"]] == ["succeeded"] * 300
        assert by_kind["batch.settled"]["request"]["items"][299]["metadata"]["k"] == "clk_[redacted]"
        assert len(by_kind["request.received"]["answer"]["result"]["items"]) == 300
    with pymongo.MongoClient(own.mongo_url, serverSelectionTimeoutMS=5000) as client:
        large = list(client.get_default_database()[COLLECTION].find({"operation_id": batch_id}))
        assert len(large) == 2 and all(len(r["document_json"]) > LARGE_DOCUMENT_CHARS for r in large)
        stored = json.dumps(list(client.get_default_database()[COLLECTION].find({})), default=str)
    for value in (secret, hook_secret):
        assert value[4:20] not in stored


def test_api_keys_created_and_revoked_are_audited_for_the_trail_alone(
    audited: Settings, mongo: MongoServer, ledger: LedgerService, tenant: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    in_environment(monkeypatch, audited)
    assert cli_main(["create-api-key", "--tenant", tenant, "--name", "ops"]) == 0
    secret = capsys.readouterr().out.strip()
    assert cli_main(["list-api-keys", "--tenant", tenant]) == 0
    key_id = capsys.readouterr().out.split()[0]
    assert cli_main(["revoke-api-key", key_id]) == 0
    with audit_consumer(audited, "audit-admin"):
        found = wait_for_records(mongo.url, tenant, outbox_ids(audited, tenant))
    assert sorted(r["kind"] for r in found) == ["admin.api_key.created", "admin.api_key.revoked"]  # type: ignore[type-var]
    for record in found:
        document = record["document"]
        assert isinstance(document, dict)
        assert document["api_key"]["id"] == key_id and document["api_key"]["name"] == "ops"
        assert document["api_key"]["prefix"] == secret[:12]
        assert document["actor"].startswith("cli:")
        assert secret[12:] not in json.dumps(document)
    # Not for the tenant's event feed, nor for its webhooks, even one subscribed to every event.
    events = ledger.webhooks.events(tenant, limit=10, cursor=None, filters=EventFilter())
    assert events.events == []
    hooks = bootstrap(audited.replace(webhook_allowed_networks="127.0.0.0/8"), pool_size=1)
    try:
        hooks.webhooks.register(tenant, "http://127.0.0.1:9/hook", ["*"])
    finally:
        hooks.close()
    admin_events = [
        EventMessage(uuid.UUID(r["_id"]), r["kind"], tenant, json.dumps({"data": r["document"]}).encode())
        for r in found
    ]
    with psycopg.connect(audited.database_url) as conn:
        assert fan_out(conn, admin_events, retry_window_s=60, lease_s=60) == []
        account_event = EventMessage(uuid.uuid4(), "account.created", tenant, b'{"data": {}}')
        assert (
            len(fan_out(conn, [account_event], retry_window_s=60, lease_s=60)) == 1
        )  # the same endpoint gets the others


def received(n: int, tenant: str) -> ReceivedRequest:
    return ReceivedRequest(
        request_id=f"r{n}", received_at=datetime.now(UTC), node="n:1", tenant_id=tenant, api_key_id=None,
        method="POST", path="/v1/credits", query="", headers={}, body="{}", status=422, answer="{}",
        idempotency_key=f"k{n}",
    )  # fmt: skip


async def test_a_request_waits_for_its_record_a_bounded_time_and_the_record_is_not_lost(
    settings: Settings, tenant: str
) -> None:
    own = private_queues(settings, f"trail{key()[:8]}")
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    down = AmqpRequestTrail(closed, queue=own.audit_queue, exchange=own.events_exchange, wait_s=0.3)
    try:
        started = time.monotonic()
        await asyncio.gather(*(down.record(received(n, tenant)) for n in range(5)))
        assert time.monotonic() - started < 2.0  # the bound, plus a failed connection attempt at most
        assert len(down._unsent) == 5  # kept for the next attempt, not dropped
    finally:
        await down.close()  # still unreachable: counted as lost, and the close does not hang
    up = AmqpRequestTrail(own.amqp_url, queue=own.audit_queue, exchange=own.events_exchange, wait_s=5)
    try:
        await asyncio.gather(*(up.record(received(n, tenant)) for n in range(40)))
        assert not up._unsent
    finally:
        await up.close()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(own.amqp_url))
        documents: list[dict[str, Any]] = []
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(own.audit_queue, auto_ack=True)
            if method is None:
                break
            assert properties.type == "request.received"
            assert properties.headers["x-audit-records"] == len(json.loads(body))
            documents += json.loads(body)
        connection.close()
        assert sorted(d["request_id"] for d in documents) == sorted(f"r{n}" for n in range(40))
        assert len({d["id"] for d in documents}) == 40  # each record its own id, whatever the request id
    finally:
        delete_queues(own)
