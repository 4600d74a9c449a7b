"""Webhooks end to end on real services and real processes: the ledger stages events, a relay process publishes
them to `ledger.events`, a webhook worker process (`python -m workers.webhooks`) fans them out and delivers them
to real aiohttp receivers on 127.0.0.1; endpoints and deliveries are managed through the HTTP API (the app
factory). Loopback is allowed explicitly here (`CLEANLEDGER_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8`); nothing is
ever sent to any other address.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from core.adapters.http.webhooks import Outgoing, WebhookSender
from core.adapters.postgres.api_keys import create_api_key
from core.bootstrap import LedgerService
from core.domain.ids import new_id
from core.domain.webhooks import parse_networks
from core.settings import Settings
from ingress.app import init_app
from tests.helpers import credit, open_account
from tests.processes import ManagedProcess, free_port, settings_env

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
Db = psycopg.Connection[tuple[Any, ...]]
LOOPBACK = "127.0.0.0/8"


@pytest.fixture(scope="module")
def hook_settings(settings: Settings) -> Settings:
    """Short timeouts and backoffs so retries happen within a test; loopback receivers allowed."""
    return settings.replace(
        webhook_allowed_networks=LOOPBACK,
        webhook_timeout_s=1.0,  # short, yet generous for a receiver on this machine under other tests' load
        webhook_backoff_min_s=0.2,
        webhook_backoff_max_s=1.0,
        webhook_poll_s=0.2,
        webhook_concurrency=8,
        webhook_endpoint_concurrency=2,
        log_level="INFO",
    )


def wait_for_log(process: ManagedProcess, event: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if f'"event": "{event}"' in process.output():
            return
        assert process.popen.poll() is None, process.output()
        time.sleep(0.1)
    raise AssertionError(f"{process.name} did not log {event} within {timeout_s}s:\n{process.output()[-3000:]}")


@pytest.fixture(scope="module")
def webhook_worker(hook_settings: Settings) -> Iterator[ManagedProcess]:
    """The relay and one webhook worker, as the Procfile runs them."""
    env = settings_env(hook_settings)
    with (
        ManagedProcess.start([sys.executable, "-m", "workers.webhooks"], env=env, name="webhooks") as worker,
        ManagedProcess.start(
            [sys.executable, "-m", "workers.relay", "--poll-interval", "1"], env=env, name="relay"
        ) as relay,
    ):
        wait_for_log(worker, "webhooks.fanout_consuming")  # its queue is bound: no event can miss it
        wait_for_log(relay, "relay.started")
        yield worker


@pytest.fixture
async def api(aiohttp_client: ClientFactory, hook_settings: Settings) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(hook_settings))


@pytest.fixture
def api_key(ledger: LedgerService, tenant: str) -> str:
    return create_api_key(ledger.pool, tenant, name="tests")[1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document


@dataclass
class Receiver:
    """A real aiohttp server on 127.0.0.1; `script` answers the next requests in turn (a status, or
    ("sleep", seconds) before a 200), then `default`."""

    port: int
    received: list[Received] = field(default_factory=list)
    script: list[Any] = field(default_factory=list)
    default: int = 200
    in_flight: int = 0
    most_in_flight: int = 0  # the most requests it was answering at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read(), time.monotonic()))
        step = self.script.pop(0) if self.script else self.default
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if isinstance(step, tuple):
                await asyncio.sleep(step[1])
                return web.Response(status=200)
            return web.Response(status=step)
        finally:
            self.in_flight -= 1

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.received) >= count, f"got {len(self.received)} of {count} requests in {timeout_s}s"
        return self.received


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[], Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def start() -> Receiver:
        receiver = Receiver(free_port())
        app = web.Application()
        app.router.add_post("/hooks", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
        runners.append(runner)
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """The README's receiver-side snippet, verbatim."""
    fields = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


async def register(
    api: TestClient[Any, Any], key: str, url: str, event_types: list[str] | None = None
) -> dict[str, Any]:
    response = await api.post(
        "/v1/webhook-endpoints", json={"url": url, "event_types": event_types or ["*"]}, headers=auth(key)
    )
    document: dict[str, Any] = await response.json(content_type=None)
    assert response.status == 201, document
    return document


async def deliveries(api: TestClient[Any, Any], key: str, endpoint_id: str, **query: str) -> dict[str, Any]:
    response = await api.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries", params=query, headers=auth(key))
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def settled_delivery(
    api: TestClient[Any, Any], key: str, endpoint_id: str, status: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        page = await deliveries(api, key, endpoint_id)
        found = [d for d in page["data"] if d["status"] == status]
        if found or time.monotonic() > deadline:
            assert found, page
            return found[0]
        await asyncio.sleep(0.1)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# --- delivery, signature, secrets -----------------------------------------------------------------------------
async def test_delivery_is_signed_and_verified_by_a_real_receiver(
    api: TestClient[Any, Any],
    api_key: str,
    ledger: LedgerService,
    tenant: str,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    endpoint = await register(api, api_key, receiver.url, ["account.created", "transaction.*"])
    secret = endpoint["secret"]
    assert secret.startswith("whsec_")
    assert endpoint["event_types"] == ["account.created", "transaction.*"]

    account = await in_thread(open_account, ledger, tenant)
    await in_thread(credit, ledger, tenant, account, 1234)
    got = await receiver.wait_for(2)
    assert sorted(r.event["type"] for r in got) == ["account.created", "transaction.posted"]
    for request in got:
        assert request.headers["Content-Type"] == "application/json"
        assert verify(secret, request.headers["Cleanledger-Signature"], request.body)
        assert not verify("whsec_wrong", request.headers["Cleanledger-Signature"], request.body)
        assert not verify(secret, request.headers["Cleanledger-Signature"], request.body + b" ")
        assert request.headers["Cleanledger-Event"] == request.event["type"]
        assert request.event["tenant_id"] == tenant
        assert set(request.event) == {"id", "type", "tenant_id", "occurred_at", "data"}
    posted = next(r for r in got if r.event["type"] == "transaction.posted")
    assert posted.event["data"]["transaction"]["entries"][1]["amount"] == 1234

    # Every attempt is recorded and listed; the delivery id is the header's.
    delivered = await settled_delivery(api, api_key, endpoint["id"], "succeeded")
    page = await deliveries(api, api_key, endpoint["id"])
    assert {d["id"] for d in page["data"]} == {r.headers["Cleanledger-Delivery"] for r in got}
    assert all(d["status"] == "succeeded" and d["attempts"] == 1 for d in page["data"]), page
    (attempt,) = delivered["attempt_history"]
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["latency_ms"] >= 0

    # The secret is never shown again...
    shown = await (await api.get(f"/v1/webhook-endpoints/{endpoint['id']}", headers=auth(api_key))).json()
    listed = await (await api.get("/v1/webhook-endpoints", headers=auth(api_key))).json()
    assert "secret" not in shown and all("secret" not in e for e in listed["data"])
    assert secret not in webhook_worker.output()
    # ...but it can be rolled: the new one is shown once and signs from then on.
    rolled = await api.post(f"/v1/webhook-endpoints/{endpoint['id']}/roll-secret", headers=auth(api_key))
    assert rolled.status == 200
    new_secret = (await rolled.json())["secret"]
    assert new_secret.startswith("whsec_") and new_secret != secret
    await in_thread(credit, ledger, tenant, account, 1)
    (_, _, third) = await receiver.wait_for(3)
    assert verify(new_secret, third.headers["Cleanledger-Signature"], third.body)
    assert not verify(secret, third.headers["Cleanledger-Signature"], third.body)


async def test_unsubscribed_event_types_are_not_delivered(
    api: TestClient[Any, Any],
    api_key: str,
    ledger: LedgerService,
    tenant: str,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    await register(api, api_key, receiver.url, ["transaction.posted"])
    account = await in_thread(open_account, ledger, tenant)  # account.created: not subscribed
    await in_thread(credit, ledger, tenant, account, 5)
    (only,) = await receiver.wait_for(1)
    assert only.event["type"] == "transaction.posted"
    await asyncio.sleep(1.0)
    assert len(receiver.received) == 1


# --- retries -------------------------------------------------------------------------------------------------
async def test_retried_after_a_500_and_a_timeout(
    api: TestClient[Any, Any],
    api_key: str,
    ledger: LedgerService,
    tenant: str,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    receiver.script = [500, ("sleep", 5.0)]  # then 200; the worker gives up on an answer after 1 s
    endpoint = await register(api, api_key, receiver.url, ["account.created"])
    await in_thread(open_account, ledger, tenant)
    got = await receiver.wait_for(3)
    assert len({r.headers["Cleanledger-Delivery"] for r in got}) == 1  # one delivery, three attempts
    assert len({r.body for r in got}) == 1
    delivered = await settled_delivery(api, api_key, endpoint["id"], "succeeded")
    assert delivered["attempts"] == 3
    first, second, third = delivered["attempt_history"]
    assert (first["status_code"], first["error"]) == (500, "HTTP 500")
    assert second["status_code"] is None and second["error"].startswith("timeout")
    assert 900 <= second["latency_ms"] < 5000
    assert (third["status_code"], third["error"]) == (200, None)
    assert first["attempted_at"] < second["attempted_at"] < third["attempted_at"]


async def test_a_dead_receiver_does_not_delay_another(
    api: TestClient[Any, Any],
    ledger: LedgerService,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    """Tenant `slow` has a closed port and a receiver that never answers in time; tenant `fast`, a healthy one.
    fast's deliveries arrive promptly while slow's keep failing."""
    slow, fast = f"slow-{new_id().hex[:12]}", f"fast-{new_id().hex[:12]}"
    slow_key, fast_key = (create_api_key(ledger.pool, t)[1] for t in (slow, fast))
    hanging, healthy = await receivers(), await receivers()
    hanging.default = 0  # unused: every answer sleeps past the timeout
    hanging.script = [("sleep", 5.0)] * 1000
    dead = await register(api, slow_key, f"http://127.0.0.1:{free_port()}/closed", ["*"])
    await register(api, slow_key, hanging.url, ["*"])
    await register(api, fast_key, healthy.url, ["*"])

    # 60 deliveries due at once to the failing endpoints: many more than the worker's 8 slots.
    slow_accounts = [await in_thread(open_account, ledger, slow) for _ in range(30)]
    await hanging.wait_for(1)
    started = time.monotonic()
    fast_accounts = [await in_thread(open_account, ledger, fast) for _ in range(5)]
    await in_thread(credit, ledger, slow, slow_accounts[0], 10)
    await in_thread(credit, ledger, fast, fast_accounts[0], 10)
    got = await healthy.wait_for(6, timeout_s=15.0)
    took = time.monotonic() - started
    assert took < 10.0, took
    assert len({r.event["id"] for r in got}) == 6
    # Meanwhile the dead one is still being tried (and failing), not given up and not blocking.
    page = await deliveries(api, slow_key, dead["id"])
    assert page["data"] and all(d["status"] == "pending" for d in page["data"])
    tried = [d for d in page["data"] if d["attempts"] >= 1]
    assert tried and all(d["last_error"].startswith("connection failed") for d in tried), tried
    # The hanging receiver never held more than its share of the worker's slots.
    assert 1 <= hanging.most_in_flight <= 2  # CLEANLEDGER_WEBHOOK_ENDPOINT_CONCURRENCY


async def test_an_event_seen_twice_and_two_workers_still_deliver_each_once(
    api: TestClient[Any, Any],
    api_key: str,
    ledger: LedgerService,
    tenant: str,
    hook_settings: Settings,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    await register(api, api_key, receiver.url, ["*"])
    with ManagedProcess.start(
        [sys.executable, "-m", "workers.webhooks"], env=settings_env(hook_settings), name="webhooks-2"
    ) as second:
        await in_thread(wait_for_log, second, "webhooks.fanout_consuming")
        for _ in range(20):
            await in_thread(open_account, ledger, tenant)
        # The same event published twice more (the relay is at least once): nothing new to deliver.
        document = {"id": str(new_id()), "type": "test.twice", "tenant_id": tenant, "occurred_at": "x", "data": {}}
        await in_thread(publish_twice, hook_settings, document)
        got = await receiver.wait_for(21)
        await asyncio.sleep(1.5)
        assert second.popen.poll() is None
    assert len(receiver.received) == 21, [r.event["type"] for r in receiver.received]
    assert len({r.headers["Cleanledger-Delivery"] for r in got}) == 21
    assert sum(r.event["type"] == "test.twice" for r in got) == 1


def publish_twice(settings: Settings, document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    publish_events(settings, [(document["type"], body, None)] * 2)


def publish_events(settings: Settings, messages: list[tuple[str, bytes, dict[str, Any] | None]]) -> None:
    """(routing key, body, properties) messages published on the events exchange, each confirmed."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for routing_key, body, properties in messages:
            channel.basic_publish(
                settings.events_exchange, routing_key, body, pika.BasicProperties(**properties) if properties else None
            )
    finally:
        connection.close()


async def test_a_wanted_event_whose_body_is_not_json_is_dropped_and_the_others_delivered(
    api: TestClient[Any, Any],
    api_key: str,
    tenant: str,
    hook_settings: Settings,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    """The fan-out decides from the message's properties (as the relay sets them) and reads a body only when an
    endpoint wants it: a broken one is dropped there, in the same batch as good ones, and the worker lives on."""
    receiver = await receivers()
    await register(api, api_key, receiver.url, ["test.*"])
    good = {"id": str(new_id()), "type": "test.good", "tenant_id": tenant, "occurred_at": "x", "data": {"n": 1}}
    messages = [
        (str(new_id()), "test.broken", b"{not json"),
        (str(new_id()), "test.list", b"[1, 2]"),
        (str(new_id()), "other.ignored", b"\xff not even utf-8"),  # no endpoint wants it: never read
        (good["id"], "test.good", json.dumps(good).encode()),
    ]
    await in_thread(publish_with_properties, hook_settings, tenant, messages)
    got = await receiver.wait_for(1)
    await asyncio.sleep(1.0)
    assert [r.event for r in receiver.received] == [good]
    assert got[0].headers["Cleanledger-Event"] == "test.good"
    assert webhook_worker.popen.poll() is None
    assert webhook_worker.output().count('"event": "webhooks.event_invalid"') >= 2


def publish_with_properties(settings: Settings, tenant: str, messages: list[tuple[str, str, bytes]]) -> None:
    """(event id, type, body) messages published as the relay publishes events: id, type and tenant in the
    message's properties."""
    publish_events(
        settings,
        [
            (event_type, body, {"message_id": event_id, "type": event_type, "headers": {"tenant_id": tenant}})
            for event_id, event_type, body in messages
        ],
    )


async def test_resend_of_a_failed_delivery(
    api: TestClient[Any, Any],
    api_key: str,
    ledger: LedgerService,
    tenant: str,
    db: Db,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    receiver.default = 503
    endpoint = await register(api, api_key, receiver.url, ["account.created"])
    await in_thread(open_account, ledger, tenant)
    await receiver.wait_for(1)
    # The retry window runs out: the next failure is the last.
    db.execute("UPDATE webhook_deliveries SET expires_at = now() WHERE endpoint_id = %s", (endpoint["id"],))
    failed = await settled_delivery(api, api_key, endpoint["id"], "failed")
    assert failed["last_status"] == 503 and failed["next_attempt_at"] is None
    tries = len(receiver.received)
    await asyncio.sleep(1.0)
    assert len(receiver.received) == tries  # failed is final: no more attempts

    path = f"/v1/webhook-endpoints/{endpoint['id']}/deliveries/{failed['id']}"
    receiver.default = 200
    response = await api.post(f"{path}/resend", headers=auth(api_key))
    assert response.status == 202, await response.text()
    resent = await response.json()
    assert resent["status"] == "pending"
    again = await api.post(f"{path}/resend", headers=auth(api_key))
    resent_twice = again.status == 202  # the worker had delivered it already: finished, so sent once more
    if not resent_twice:
        assert again.status == 409 and (await again.json())["code"] == "webhook-delivery-pending"
    delivered = await settled_delivery(api, api_key, endpoint["id"], "succeeded")
    if resent_twice:  # wait for the second send too, so the history below is complete
        for _ in range(100):
            if [a["status_code"] for a in delivered["attempt_history"]].count(200) == 2:
                break
            await asyncio.sleep(0.05)
            delivered = await settled_delivery(api, api_key, endpoint["id"], "succeeded")
    assert delivered["id"] == failed["id"]
    statuses = [a["status_code"] for a in delivered["attempt_history"]]
    oks = 2 if resent_twice else 1
    assert statuses == [503] * (len(statuses) - oks) + [200] * oks, statuses
    # Only a finished delivery can be sent again.
    pending = await api.post(f"{path}/resend", headers=auth(api_key))
    assert pending.status == 202  # succeeded is finished too
    await settled_delivery(api, api_key, endpoint["id"], "succeeded")


# --- SSRF ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://10.0.0.1/hooks", "webhook-url-forbidden"),
        ("http://169.254.169.254/latest/meta-data", "webhook-url-forbidden"),
        ("http://192.168.1.10:8080/", "webhook-url-forbidden"),
        ("http://[::1]/", "webhook-url-forbidden"),
        ("http://[::ffff:10.0.0.1]/", "webhook-url-forbidden"),
        ("http://[fe80::1]/", "webhook-url-forbidden"),
        ("http://0.0.0.0/", "webhook-url-forbidden"),
        ("http://224.0.0.1/", "webhook-url-forbidden"),
        ("http://127.0.0.1:9/", "webhook-url-forbidden"),
        ("ftp://example.com/hooks", "webhook-url-invalid"),
        ("file:///etc/passwd", "webhook-url-invalid"),
        ("gopher://127.0.0.1:6379/_INFO", "webhook-url-invalid"),
        ("http://user:pw@example.com/", "webhook-url-invalid"),
        ("http:///nohost", "webhook-url-invalid"),
        ("https://example.com/" + "a" * 2048, "webhook-url-invalid"),
    ],
)
async def test_ssrf_targets_are_refused_at_registration(
    aiohttp_client: ClientFactory, settings: Settings, api_key: str, url: str, code: str
) -> None:
    strict = await aiohttp_client(init_app(settings.replace(webhook_allowed_networks="")))
    response = await strict.post(
        "/v1/webhook-endpoints", json={"url": url, "event_types": ["*"]}, headers=auth(api_key)
    )
    problem = await response.json(content_type=None)
    assert response.status == 422, problem
    assert problem["code"] == code
    assert response.content_type == "application/problem+json"
    listed = await (await strict.get("/v1/webhook-endpoints", headers=auth(api_key))).json()
    assert listed["data"] == []


async def test_localhost_is_refused_unless_allowed_and_nothing_is_sent(
    aiohttp_client: ClientFactory,
    settings: Settings,
    api_key: str,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    named = f"http://localhost:{receiver.port}/hooks"
    strict = await aiohttp_client(init_app(settings.replace(webhook_allowed_networks="")))
    response = await strict.post(
        "/v1/webhook-endpoints", json={"url": named, "event_types": ["*"]}, headers=auth(api_key)
    )
    assert response.status == 422
    assert (await response.json())["code"] == "webhook-url-forbidden"
    # At delivery time too (a name may resolve elsewhere by then): the sender refuses before connecting,
    # whether the host is a name (checked by its resolver) or an address.
    sender = WebhookSender(timeout_s=1.0, allowed=parse_networks(""), max_connections=4)
    try:
        for url in (named, receiver.url):
            result = await sender.send(Outgoing(new_id(), url, "account.created", b'{"id": "x"}', "whsec_test"))
            assert result.status_code is None and result.error is not None and result.error.startswith("refused"), (
                result
            )
    finally:
        await sender.close()
    assert receiver.received == []
    # Allowed explicitly, the same receiver is reached.
    allowed = WebhookSender(timeout_s=2.0, allowed=parse_networks(LOOPBACK), max_connections=4)
    try:
        result = await allowed.send(Outgoing(new_id(), receiver.url, "account.created", b'{"id": "x"}', "whsec_test"))
    finally:
        await allowed.close()
    assert result.status_code == 200
    assert len(receiver.received) == 1


async def test_redirects_are_not_followed(receivers: Callable[[], Awaitable[Receiver]]) -> None:
    target = await receivers()
    redirecting = await receivers()
    redirecting.default = 307
    sender = WebhookSender(timeout_s=2.0, allowed=parse_networks(LOOPBACK), max_connections=4)
    try:
        result = await sender.send(Outgoing(new_id(), redirecting.url, "x.y", b'{"id": "x"}', "whsec_test"))
    finally:
        await sender.close()
    assert result.status_code == 307 and not result.succeeded
    assert target.received == []


# --- tenant isolation, deletion ------------------------------------------------------------------------------
async def test_another_tenants_endpoint_and_deliveries_are_not_found(
    api: TestClient[Any, Any],
    api_key: str,
    ledger: LedgerService,
    tenant: str,
    webhook_worker: ManagedProcess,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    receiver = await receivers()
    endpoint = await register(api, api_key, receiver.url, ["account.created"])
    await in_thread(open_account, ledger, tenant)
    delivery = await settled_delivery(api, api_key, endpoint["id"], "succeeded")
    other = create_api_key(ledger.pool, f"other-{new_id().hex[:12]}")[1]
    base = f"/v1/webhook-endpoints/{endpoint['id']}"
    for method, path, code in [
        ("GET", base, "webhook-endpoint-not-found"),
        ("DELETE", base, "webhook-endpoint-not-found"),
        ("POST", f"{base}/roll-secret", "webhook-endpoint-not-found"),
        ("GET", f"{base}/deliveries", "webhook-endpoint-not-found"),
        ("GET", f"{base}/deliveries/{delivery['id']}", "webhook-delivery-not-found"),
        ("POST", f"{base}/deliveries/{delivery['id']}/resend", "webhook-endpoint-not-found"),
    ]:
        response = await api.request(method, path, headers=auth(other))
        assert response.status == 404, (method, path)
        assert (await response.json())["code"] == code, (method, path)
    assert (await (await api.get("/v1/webhook-endpoints", headers=auth(other))).json())["data"] == []
    assert (await (await api.get("/v1/events", headers=auth(other))).json())["data"] == []

    # The owner can delete it: gone from the API, and nothing more is delivered to it.
    assert (await api.delete(base, headers=auth(api_key))).status == 204
    assert (await api.get(base, headers=auth(api_key))).status == 404
    assert (await api.delete(base, headers=auth(api_key))).status == 404
    await in_thread(open_account, ledger, tenant)
    await asyncio.sleep(1.5)
    assert len(receiver.received) == 1


async def test_endpoint_body_is_validated(api: TestClient[Any, Any], api_key: str) -> None:
    for body in (
        {"url": "http://127.0.0.1:1/"},
        {"url": "http://127.0.0.1:1/", "event_types": []},
        {"url": "http://127.0.0.1:1/", "event_types": ["Not A Type"]},
        {"url": 5, "event_types": ["*"]},
        {"url": "http://127.0.0.1:1/", "event_types": ["*"], "extra": 1},
    ):
        response = await api.post("/v1/webhook-endpoints", json=body, headers=auth(api_key))
        assert response.status in (400, 422), body
        assert response.content_type == "application/problem+json"
    bad_id = await api.get("/v1/webhook-endpoints/not-a-uuid", headers=auth(api_key))
    assert bad_id.status == 400


# --- the event feed --------------------------------------------------------------------------------------------
async def test_events_feed_pages_and_filters(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService, tenant: str
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    accounts = [await in_thread(open_account, ledger, tenant) for _ in range(3)]
    middle = datetime.now(UTC)
    await asyncio.sleep(0.01)
    for account in accounts[:2]:
        await in_thread(credit, ledger, tenant, account, 100)

    async def page(**query: str) -> dict[str, Any]:
        response = await api.get("/v1/events", params=query, headers=auth(api_key))
        assert response.status == 200, await response.text()
        document: dict[str, Any] = await response.json()
        return document

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        current = await page(limit="2", **({"cursor": cursor} if cursor else {}))
        seen.extend(current["data"])
        cursor = current["next_cursor"]
        if not current["has_more"]:
            break
    assert [e["type"] for e in seen] == ["account.created"] * 3 + ["transaction.posted"] * 2
    assert len({e["id"] for e in seen}) == 5 and all(e["tenant_id"] == tenant for e in seen)
    # Caught up: the last cursor answers an empty page and stays usable for what comes next.
    assert cursor is not None
    empty = await page(limit="2", cursor=cursor)
    assert empty["data"] == [] and empty["has_more"] is False and empty["next_cursor"] == cursor
    await in_thread(credit, ledger, tenant, accounts[2], 1)
    newer = await page(limit="2", cursor=cursor)
    assert [e["type"] for e in newer["data"]] == ["transaction.posted"]

    posted = await page(type="transaction.posted")
    assert [e["type"] for e in posted["data"]] == ["transaction.posted"] * 3
    both = await page(type="account.created,transaction.posted", limit="1000")
    assert len(both["data"]) == 6
    early = await page(since=before.isoformat(), until=middle.isoformat())
    assert [e["type"] for e in early["data"]] == ["account.created"] * 3
    late = await page(since=middle.isoformat())
    assert [e["type"] for e in late["data"]] == ["transaction.posted"] * 3

    # A cursor belongs to its filters.
    first = await page(type="account.created", limit="1")
    mixed = await api.get(
        f"/v1/events?limit=1&cursor={quote(first['next_cursor'])}&type=transaction.posted", headers=auth(api_key)
    )
    assert mixed.status == 400 and (await mixed.json())["code"] == "request-invalid"
    for query in ("limit=0", "cursor=%21%21", "since=yesterday", "until=2020-01-01T00:00:00"):
        response = await api.get(f"/v1/events?{query}", headers=auth(api_key))
        assert response.status == 400, query
