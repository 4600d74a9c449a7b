"""The HTTP API through the app factory, against real PostgreSQL, Redis, RabbitMQ and a real worker process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from psycopg import sql

from core.adapters.postgres.api_keys import create_api_key, revoke_api_key
from core.adapters.rabbitmq.commands import CommandPublisher
from core.application.commands import Credit
from core.application.ports import Claim
from core.bootstrap import LedgerService
from core.cli import main as cli_main
from core.domain.ids import external_account_id, new_id
from core.domain.money import Money
from core.settings import Settings
from ingress.app import init_app
from ingress.context import INGRESS
from tests.helpers import record_pending
from tests.processes import ManagedProcess
from tests.services import delete_queues, private_queues

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
CLOSED_PORT_AMQP = "amqp://guest:guest@127.0.0.1:1/%2F"
CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
def api_key(ledger: LedgerService, tenant: str) -> str:
    return create_api_key(ledger.pool, tenant, name="tests")[1]


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings))


def headers(key: str, idempotency_key: str | None = None, **extra: str) -> dict[str, str]:
    h = {"Authorization": f"Bearer {key}", **extra}
    if idempotency_key is not None:
        h["Idempotency-Key"] = idempotency_key
    return h


async def post(
    client: TestClient[Any, Any], path: str, key: str, body: Any, *, wait: int | None = 10, **extra: str
) -> tuple[int, dict[str, Any]]:
    """POST like a well-behaved client: on 409 idempotency-key-in-use, wait as told and send it again."""
    h = headers(key, extra.pop("idem", None) or uuid.uuid4().hex, **extra)
    if wait is not None:
        h["Prefer"] = f"wait={wait}"
    for _ in range(50):
        response = await client.post(path, json=body, headers=h)
        if response.status != 409:
            return response.status, await response.json(content_type=None)
        assert (await response.json(content_type=None))["code"] == "idempotency-key-in-use"
        await asyncio.sleep(0.1)
    raise AssertionError("still in use after 5 s")


async def new_account(client: TestClient[Any, Any], key: str, **body: Any) -> str:
    status, doc = await post(client, "/v1/accounts", key, {"currency": "USD", **body})
    assert status == 201, doc
    return str(doc["result"]["account"]["id"])


async def settle(client: TestClient[Any, Any], key: str, operation_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        response = await client.get(f"/v1/operations/{operation_id}", headers=headers(key))
        assert response.status == 200
        doc: dict[str, Any] = await response.json()
        if doc["status"] != "pending" or asyncio.get_running_loop().time() > deadline:
            return doc
        await asyncio.sleep(0.05)


# --- happy paths ---------------------------------------------------------------------------------------------
async def test_post_then_poll_walkthrough(api: TestClient[Any, Any], api_key: str) -> None:
    a = await new_account(api, api_key)
    b = await new_account(api, api_key, overdraft_limit=500, metadata={"owner": "bob"})
    response = await api.post(
        "/v1/credits",
        json={"account_id": a, "amount": 10_000, "currency": "USD"},
        headers=headers(api_key, "credit-1"),
    )
    assert response.status == 202
    accepted = await response.json()
    assert accepted["status"] == "pending"
    assert response.headers["Location"] == f"/v1/operations/{accepted['id']}"
    settled = await settle(api, api_key, accepted["id"])
    assert settled["status"] == "succeeded"
    assert settled["result"]["transaction"]["kind"] == "credit"

    status, transfer = await post(
        api,
        "/v1/transfers",
        api_key,
        {"source_id": a, "destination_id": b, "amount": 2_500, "currency": "USD", "metadata": {"ref": "inv-7"}},
    )
    assert status == 201
    assert transfer["result"]["transaction"]["metadata"] == {"ref": "inv-7"}
    status, _ = await post(api, "/v1/debits", api_key, {"account_id": b, "amount": 3_000, "currency": "USD"})
    assert status == 201  # 2,500 in, 3,000 out: within b's 500 overdraft

    account = await (await api.get(f"/v1/accounts/{b}", headers=headers(api_key))).json()
    assert account["balance"] == {"posted": -500, "pending_debits": 0, "pending_credits": 0, "available": -500}
    assert account["overdraft_limit"] == 500
    assert account["metadata"] == {"owner": "bob"}

    page = await (await api.get(f"/v1/accounts/{a}/entries?limit=1", headers=headers(api_key))).json()
    assert [e["amount"] for e in page["data"]] == [-2_500]
    assert page["has_more"] is True
    rest = await (
        await api.get(f"/v1/accounts/{a}/entries?limit=10&cursor={page['next_cursor']}", headers=headers(api_key))
    ).json()
    assert [e["amount"] for e in rest["data"]] == [10_000]
    assert rest["has_more"] is False
    oldest = await (await api.get(f"/v1/accounts/{a}/entries?order=asc", headers=headers(api_key))).json()
    assert [e["balance_after"] for e in oldest["data"]] == [10_000, 7_500]


async def test_business_rejection_is_a_settled_failed_operation(api: TestClient[Any, Any], api_key: str) -> None:
    a, b = await new_account(api, api_key), await new_account(api, api_key)
    status, doc = await post(
        api, "/v1/transfers", api_key, {"source_id": a, "destination_id": b, "amount": 1, "currency": "USD"}
    )
    assert status == 200
    assert doc["status"] == "failed"
    assert doc["problem"]["code"] == "insufficient-funds"
    assert doc["problem"]["type"].endswith("/insufficient-funds")


# --- documented errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"account_id": "not-a-uuid", "amount": 5, "currency": "USD"}, 422, "validation-failed"),
        ({"account_id": str(uuid.uuid4()), "amount": 5.5, "currency": "USD"}, 422, "validation-failed"),
        ({"account_id": str(uuid.uuid4()), "amount": "5", "currency": "USD"}, 422, "validation-failed"),
        ({"account_id": str(uuid.uuid4()), "amount": -5, "currency": "USD"}, 422, "amount-invalid"),
        ({"account_id": str(uuid.uuid4()), "amount": 0, "currency": "USD"}, 422, "amount-invalid"),
        ({"account_id": str(uuid.uuid4()), "amount": 10**30, "currency": "USD"}, 422, "amount-invalid"),
        ({"account_id": str(uuid.uuid4()), "amount": 5, "currency": "usd"}, 422, "currency-invalid"),
        ({"account_id": str(uuid.uuid4()), "amount": 5, "currency": "USD", "extra": 1}, 422, "validation-failed"),
        ({"account_id": str(uuid.uuid4()), "amount": 5}, 422, "validation-failed"),
        ([1, 2], 422, "validation-failed"),
        (
            {"account_id": str(uuid.uuid4()), "amount": 5, "currency": "USD", "metadata": {"k": "v" * 5000}},
            422,
            "metadata-invalid",
        ),
    ],
)
async def test_bad_bodies_get_problem_documents(
    api: TestClient[Any, Any], api_key: str, body: Any, status: int, code: str
) -> None:
    response = await api.post("/v1/credits", json=body, headers=headers(api_key, uuid.uuid4().hex))
    assert response.status == status
    assert response.content_type == "application/problem+json"
    doc = await response.json(content_type=None)
    assert doc["code"] == code
    assert doc["detail"]


async def test_no_account_can_be_opened_on_a_system_account_id(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService, tenant: str
) -> None:
    for squat in (external_account_id(f"{tenant}-victim", "EUR"), external_account_id(tenant, "USD")):
        body = {"currency": "EUR", "id": str(squat)}
        response = await api.post("/v1/accounts", json=body, headers=headers(api_key, uuid.uuid4().hex))
        assert response.status == 422
        assert (await response.json(content_type=None))["code"] == "validation-failed"
    assert ledger.queries.account(f"{tenant}-victim", external_account_id(f"{tenant}-victim", "EUR")) is None


async def test_transport_errors_are_problems_too(api: TestClient[Any, Any], api_key: str, settings: Settings) -> None:
    async def problem(method: str, path: str, **kw: Any) -> tuple[int, str]:
        response = await api.request(method, path, **kw)
        assert response.content_type == "application/problem+json"
        return response.status, (await response.json(content_type=None))["code"]

    h = headers(api_key, "k-1")
    assert await problem("POST", "/v1/credits", data=b"{nope", headers={**h, "Content-Type": "application/json"}) == (
        400,
        "request-invalid",
    )
    assert await problem("POST", "/v1/credits", json={}, headers=headers(api_key)) == (400, "idempotency-key-missing")
    assert await problem("POST", "/v1/credits", json={}, headers=headers(api_key, "has space")) == (
        400,
        "idempotency-key-invalid",
    )
    big = b'{"metadata": "' + b"x" * settings.max_body_bytes + b'"}'
    assert await problem("POST", "/v1/credits", data=big, headers={**h, "Content-Type": "application/json"}) == (
        413,
        "payload-too-large",
    )
    assert await problem(
        "POST", "/v1/credits", data=b"a=1", headers={**h, "Content-Type": "application/x-www-form-urlencoded"}
    ) == (415, "unsupported-media-type")
    assert await problem("GET", "/v1/accounts/not-a-uuid", headers=h) == (400, "request-invalid")
    assert await problem("GET", f"/v1/accounts/{uuid.uuid4()}", headers=h) == (404, "account-not-found")
    assert await problem("GET", f"/v1/operations/{uuid.uuid4()}", headers=h) == (404, "operation-not-found")
    assert await problem("GET", f"/v1/accounts/{uuid.uuid4()}/entries?limit=5000", headers=h) == (
        400,
        "request-invalid",
    )
    assert await problem("GET", "/v1/nothing-here", headers=h) == (404, "not-found")
    assert await problem("DELETE", "/v1/credits", headers=h) == (405, "method-not-allowed")


# --- auth and tenants ----------------------------------------------------------------------------------------
async def test_api_key_is_required_and_checked(api: TestClient[Any, Any], ledger: LedgerService, tenant: str) -> None:
    key, secret = create_api_key(ledger.pool, tenant)
    for h in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer clk_not-a-real-key"}):
        response = await api.get(f"/v1/accounts/{uuid.uuid4()}", headers=h)
        assert response.status == 401
        assert (await response.json(content_type=None))["code"] == "unauthorized"
    revoke_api_key(ledger.pool, key.id)
    assert (await api.get(f"/v1/accounts/{uuid.uuid4()}", headers=headers(secret))).status == 401


async def test_a_revoked_key_stops_working_at_once_on_every_node(
    aiohttp_client: ClientFactory, settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    # Nodes that would trust a cached key for 10 minutes: only the announcement can explain a quick 401.
    trusting = settings.replace(api_key_cache_s=600)
    nodes = [await aiohttp_client(init_app(trusting)) for _ in range(2)]
    key, secret = create_api_key(ledger.pool, tenant)
    path = f"/v1/accounts/{uuid.uuid4()}"
    for node in nodes:
        await asyncio.wait_for(node.app[INGRESS].revocations.subscribed.wait(), 5)
        assert (await node.get(path, headers=headers(secret))).status == 404  # known, and now cached

    assert cli_main(["--database-url", settings.database_url, "revoke-api-key", str(key.id)]) == 0

    deadline = asyncio.get_running_loop().time() + 5
    for node in nodes:
        while (status := (await node.get(path, headers=headers(secret))).status) != 401:
            assert status == 404
            assert asyncio.get_running_loop().time() < deadline, "the node still trusts the revoked key"
            await asyncio.sleep(0.02)


def some_client_address() -> str:
    """A documentation-range address of this test's own, so its lookup bucket in the shared Redis is fresh."""
    return f"198.51.100.{uuid.uuid4().int % 250 + 1}, 10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"


async def test_unrecognised_api_keys_are_throttled_per_client_address(
    aiohttp_client: ClientFactory, settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    node = await aiohttp_client(init_app(settings.replace(auth_lookup_burst=3, auth_lookup_per_second=0.2)))
    attacker = some_client_address()
    path = f"/v1/accounts/{uuid.uuid4()}"

    async def status(secret: str, forwarded_for: str) -> int:
        headers = {"Authorization": f"Bearer {secret}", "X-Forwarded-For": forwarded_for}
        return (await node.get(path, headers=headers)).status

    # The same wrong secret again and again is answered from the ingress's memory: one lookup in all.
    assert [await status("clk_the-same-guess", attacker) for _ in range(6)] == [401] * 6
    # New guesses each cost a lookup: two more fit in the bucket of 3, then 429 with Retry-After.
    guesses = [await status(f"clk_guess-{i}", attacker) for i in range(4)]
    assert guesses == [401, 401, 429, 429]
    response = await node.get(path, headers={"Authorization": "Bearer clk_x", "X-Forwarded-For": attacker})
    assert response.status == 429
    assert float(response.headers["Retry-After"]) >= 1
    # Hops the client put before nginx's own are ignored: a forged first hop does not get a fresh bucket.
    forged = f"203.0.113.9, {attacker.rsplit(', ', 1)[-1]}"
    assert await status("clk_guess-forged", forged) == 429
    # Another address, with a valid key this node has not seen yet, is served.
    secret = create_api_key(ledger.pool, tenant)[1]
    assert await status(secret, some_client_address()) == 404


async def test_tenants_are_isolated(api: TestClient[Any, Any], api_key: str, ledger: LedgerService) -> None:
    mine = await new_account(api, api_key)
    _, credit_doc = await post(api, "/v1/credits", api_key, {"account_id": mine, "amount": 900, "currency": "USD"})
    other_key = create_api_key(ledger.pool, f"other-{uuid.uuid4().hex[:12]}")[1]
    theirs = await new_account(api, other_key)
    assert (await api.get(f"/v1/accounts/{mine}", headers=headers(other_key))).status == 404
    assert (await api.get(f"/v1/accounts/{mine}/entries", headers=headers(other_key))).status == 404
    assert (await api.get(f"/v1/operations/{credit_doc['id']}", headers=headers(other_key))).status == 404
    _, stolen = await post(
        api, "/v1/transfers", other_key, {"source_id": mine, "destination_id": theirs, "amount": 100, "currency": "USD"}
    )
    assert stolen["status"] == "failed"
    assert stolen["problem"]["code"] == "account-not-found"
    account = await (await api.get(f"/v1/accounts/{mine}", headers=headers(api_key))).json()
    assert account["balance"]["posted"] == 900


# --- idempotency across nodes --------------------------------------------------------------------------------
async def test_same_key_on_two_nodes_is_one_operation(
    aiohttp_client: ClientFactory,
    settings: Settings,
    worker: ManagedProcess,
    api_key: str,
    ledger: LedgerService,
    tenant: str,
) -> None:
    node1 = await aiohttp_client(init_app(settings))
    node2 = await aiohttp_client(init_app(settings))
    node3_no_redis = await aiohttp_client(init_app(settings.replace(redis_url=CLOSED_PORT_REDIS)))
    a = await new_account(node1, api_key)
    body = {"account_id": a, "amount": 250, "currency": "USD"}
    answers = await asyncio.gather(
        *(
            post(node, "/v1/credits", api_key, body, wait=None, idem="pay-1")
            for node in (node1, node2, node3_no_redis, node1, node2)
        )
    )
    assert len({doc["id"] for _, doc in answers}) == 1
    settled = await settle(node1, api_key, answers[0][1]["id"])
    assert settled["status"] == "succeeded"
    for node in (node2, node3_no_redis):  # replay after settlement: the final result, flagged as a replay
        response = await node.post("/v1/credits", json=body, headers=headers(api_key, "pay-1"))
        assert response.status == 200
        assert response.headers["Idempotent-Replayed"] == "true"
        assert (await response.json())["result"] == settled["result"]
    for node in (node1, node3_no_redis):  # same key, another request: refused on any node, with or without Redis
        response = await node.post("/v1/credits", json={**body, "amount": 251}, headers=headers(api_key, "pay-1"))
        assert response.status == 422
        assert (await response.json(content_type=None))["code"] == "idempotency-key-reused"
    assert ledger.queries.account(tenant, uuid.UUID(a)).balance == 250  # type: ignore[union-attr]


async def test_prefer_wait_without_redis_falls_back_to_polling(
    aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess, api_key: str
) -> None:
    node = await aiohttp_client(init_app(settings.replace(redis_url=CLOSED_PORT_REDIS)))
    a = await new_account(node, api_key)  # new_account itself waits: settled through PostgreSQL polling
    status, doc = await post(node, "/v1/credits", api_key, {"account_id": a, "amount": 1, "currency": "USD"}, wait=10)
    assert status == 201
    assert doc["status"] == "succeeded"


async def test_prefer_wait_answers_202_when_not_settled_in_time(
    aiohttp_client: ClientFactory, settings: Settings, api_key: str, ledger: LedgerService
) -> None:
    # No worker consumes this queue, so nothing settles.
    lonely = private_queues(settings, "unconsumed")
    try:
        node = await aiohttp_client(init_app(lonely))
        started = asyncio.get_running_loop().time()
        status, doc = await post(node, "/v1/accounts", api_key, {"currency": "EUR"}, wait=1)
        assert status == 202
        assert doc["status"] == "pending"
        assert 0.9 <= asyncio.get_running_loop().time() - started < 5
    finally:
        delete_queues(lonely)


# --- failure modes -------------------------------------------------------------------------------------------
async def test_broker_down_means_503_and_nothing_accepted(
    aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess, api_key: str
) -> None:
    down = await aiohttp_client(init_app(settings.replace(amqp_url=CLOSED_PORT_AMQP)))
    response = await down.post("/v1/accounts", json={"currency": "USD"}, headers=headers(api_key, "acct-when-down"))
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json(content_type=None))["code"] == "service-unavailable"
    # Nothing was half-accepted: the same key on a healthy node is a fresh, working request.
    healthy = await aiohttp_client(init_app(settings))
    status, doc = await post(healthy, "/v1/accounts", api_key, {"currency": "USD"}, idem="acct-when-down")
    assert status == 201
    assert doc["status"] == "succeeded"


async def test_burst_is_rate_limited_per_api_key(
    aiohttp_client: ClientFactory, settings: Settings, api_key: str, ledger: LedgerService, tenant: str
) -> None:
    node = await aiohttp_client(init_app(settings.replace(rate_limit_burst=5, rate_limit_per_second=0.5)))
    statuses = []
    for _ in range(12):
        response = await node.get(f"/v1/accounts/{uuid.uuid4()}", headers=headers(api_key))
        statuses.append(response.status)
        if response.status == 429:
            assert float(response.headers["Retry-After"]) >= 1
            assert (await response.json(content_type=None))["code"] == "rate-limited"
    assert statuses[:5] == [404] * 5
    assert statuses[5:] == [429] * 7
    other = create_api_key(ledger.pool, tenant)[1]  # another key has its own bucket
    assert (await node.get(f"/v1/accounts/{uuid.uuid4()}", headers=headers(other))).status == 404


def test_a_message_delivered_twice_settles_once(
    settings: Settings, worker: ManagedProcess, ledger: LedgerService, tenant: str
) -> None:
    from tests.helpers import balance, open_account

    account = open_account(ledger, tenant)
    command = Credit(tenant, account, Money.for_posting(333, "USD"))
    operation_id = new_id()
    record_pending(ledger, command, "twice", operation_id)
    publisher = CommandPublisher(settings.amqp_url, queue_name=settings.command_queue)
    try:
        for _ in range(3):
            publisher.publish(operation_id=operation_id, idempotency_key="twice", command=command)
    finally:
        publisher.close()
    deadline = time.monotonic() + 15
    while (op := ledger.queries.operation(tenant, operation_id)) is not None and op.status == "pending":
        assert time.monotonic() < deadline, "the operation never settled"
        time.sleep(0.05)
    time.sleep(0.5)  # let the duplicates be consumed too
    assert op is not None and op.status == "succeeded"
    with psycopg.connect(settings.database_url) as conn:
        count = conn.execute("SELECT count(*) FROM transactions WHERE operation_id = %s", (operation_id,)).fetchone()
    assert count == (1,)
    assert balance(ledger, tenant, account) == 333


async def test_duplicate_while_the_first_is_still_publishing_is_told_to_retry(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a = await new_account(api, api_key)
    body = {"account_id": a, "amount": 40, "currency": "USD"}
    command = Credit(tenant, uuid.UUID(a), Money.for_posting(40, "USD"))
    operation_id = new_id()
    # Another node recorded the operation and is publishing it right now (not confirmed yet).
    await api.app[INGRESS].records.record([Claim.for_command(command, "in-flight", operation_id)])  # type: ignore[index]
    response = await api.post("/v1/credits", json=body, headers=headers(api_key, "in-flight"))
    assert response.status == 409
    assert response.headers["Retry-After"] == "1"
    assert (await response.json(content_type=None))["code"] == "idempotency-key-in-use"
    # Once that publish is long overdue, its publisher is gone and the sweeper owns the operation: the
    # duplicate now gets the operation (202), never an id that could still be withdrawn.
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '1 hour' WHERE operation_id = %s",
            (operation_id,),
        )
    response = await api.post("/v1/credits", json=body, headers=headers(api_key, "in-flight"))
    assert response.status == 202
    assert (await response.json())["id"] == str(operation_id)


async def test_concurrent_requests_with_a_new_key_share_one_lookup(
    aiohttp_client: ClientFactory, settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    # One uncached lookup allowed per client address, yet 40 concurrent first requests with a brand-new key all
    # pass: they share one lookup. (The address is the test's own, through the trusted local proxy header.)
    node = await aiohttp_client(init_app(settings.replace(auth_lookup_burst=1, auth_lookup_per_second=0.01)))
    fresh = create_api_key(ledger.pool, tenant)[1]
    client = {"X-Forwarded-For": f"2001:db8::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"}
    statuses = await asyncio.gather(
        *(node.get(f"/v1/accounts/{uuid.uuid4()}", headers=headers(fresh, **client)) for _ in range(40))
    )
    assert [r.status for r in statuses] == [404] * 40  # authenticated, and the account is unknown


# --- account lifecycle -------------------------------------------------------------------------------------------
async def status_change(api: TestClient[Any, Any], key: str, account: str, action: str, **extra: str) -> dict[str, Any]:
    status, doc = await post(api, f"/v1/accounts/{account}/{action}", key, None, **extra)
    assert status in (200, 201), doc
    return doc


async def test_freeze_unfreeze_close(api: TestClient[Any, Any], api_key: str) -> None:
    a = await new_account(api, api_key)
    assert (await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 500, "currency": "USD"}))[0] == 201

    frozen = await status_change(api, api_key, a, "freeze")
    assert (frozen["status"], frozen["result"]["account"]["status"]) == ("succeeded", "frozen")
    _, refused = await post(api, "/v1/debits", api_key, {"account_id": a, "amount": 1, "currency": "USD"})
    assert (refused["status"], refused["problem"]["code"]) == ("failed", "account-frozen")
    _, refused = await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 1, "currency": "USD"})
    assert refused["problem"]["code"] == "account-frozen"  # frozen both ways

    assert (await status_change(api, api_key, a, "unfreeze"))["result"]["account"]["status"] == "open"
    _, not_empty = await post(api, f"/v1/accounts/{a}/close", api_key, None)
    assert (not_empty["status"], not_empty["problem"]["code"]) == ("failed", "account-not-empty")

    assert (await post(api, "/v1/debits", api_key, {"account_id": a, "amount": 500, "currency": "USD"}))[0] == 201
    closed = await status_change(api, api_key, a, "close", idem="close-it")
    assert closed["result"]["account"]["status"] == "closed"
    again = await api.post(f"/v1/accounts/{a}/close", headers=headers(api_key, "close-it"))
    assert (again.status, (await again.json())["id"]) == (200, closed["id"])  # the same operation, replayed
    assert again.headers["Idempotent-Replayed"] == "true"
    _, after = await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 1, "currency": "USD"})
    assert after["problem"]["code"] == "account-closed"
    _, reopen = await post(api, f"/v1/accounts/{a}/unfreeze", api_key, None)
    assert reopen["problem"]["code"] == "account-closed"  # closed is for good
    account = await (await api.get(f"/v1/accounts/{a}", headers=headers(api_key))).json()
    assert (account["status"], account["balance"]["posted"]) == ("closed", 0)


async def test_status_changes_stay_within_the_tenant_and_take_no_body(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService
) -> None:
    a = await new_account(api, api_key)
    other_key = create_api_key(ledger.pool, f"t-{uuid.uuid4().hex[:12]}")[1]
    _, theirs = await post(api, f"/v1/accounts/{a}/freeze", other_key, None)
    assert (theirs["status"], theirs["problem"]["code"]) == ("failed", "account-not-found")
    mine = await api.get(f"/v1/accounts/{a}", headers=headers(api_key))
    assert (await mine.json())["status"] == "open"  # untouched by the other tenant
    response = await api.post(f"/v1/accounts/{a}/freeze", json={"status": "open"}, headers=headers(api_key, "x"))
    assert (response.status, (await response.json())["code"]) == (422, "validation-failed")
    response = await api.post(f"/v1/accounts/{a}/close", headers=headers(api_key))  # no Idempotency-Key
    assert response.status == 400
    response = await api.post("/v1/accounts/not-a-uuid/close", headers=headers(api_key, "y"))
    assert response.status == 400


async def patch_metadata(
    api: TestClient[Any, Any], key: str, account: str, metadata: Any, **extra: str
) -> tuple[int, dict[str, Any]]:
    h = {**headers(key, uuid.uuid4().hex, **extra), "Prefer": "wait=10"}
    response = await api.patch(f"/v1/accounts/{account}", json={"metadata": metadata}, headers=h)
    return response.status, await response.json(content_type=None)


async def test_metadata_is_patched_key_by_key(api: TestClient[Any, Any], api_key: str) -> None:
    a = await new_account(api, api_key, metadata={"owner": "bob", "tier": "gold"})
    status, doc = await patch_metadata(api, api_key, a, {"tier": "platinum", "owner": None, "ref": "crm-42"})
    assert status == 201, doc
    assert doc["result"]["account"]["metadata"] == {"tier": "platinum", "ref": "crm-42"}
    account = await (await api.get(f"/v1/accounts/{a}", headers=headers(api_key))).json()
    assert account["metadata"] == {"tier": "platinum", "ref": "crm-42"}
    # Postings do not touch it, and it survives them.
    assert (await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 5, "currency": "USD"}))[0] == 201
    account = await (await api.get(f"/v1/accounts/{a}", headers=headers(api_key))).json()
    assert (account["metadata"], account["balance"]["posted"]) == ({"tier": "platinum", "ref": "crm-42"}, 5)


async def test_a_bad_metadata_patch_changes_nothing(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService
) -> None:
    a = await new_account(api, api_key, metadata={"owner": "bob"})
    assert (await patch_metadata(api, api_key, a, {"n": 1}))[1]["code"] == "metadata-invalid"  # strings only
    assert (await patch_metadata(api, api_key, a, {}))[1]["code"] == "metadata-invalid"  # names no key
    assert (await patch_metadata(api, api_key, a, "x"))[0] == 422
    # Valid alone, but 50 keys already there: the merged result must stay within the limits.
    full = {f"k{i}": "v" for i in range(49)}
    assert (await patch_metadata(api, api_key, a, full))[0] == 201
    status, too_many = await patch_metadata(api, api_key, a, {"one-more": "v"})
    assert (status, too_many["status"], too_many["problem"]["code"]) == (200, "failed", "metadata-invalid")
    other_key = create_api_key(ledger.pool, f"t-{uuid.uuid4().hex[:12]}")[1]
    _, theirs = await patch_metadata(api, other_key, a, {"owner": "mallory"})
    assert theirs["problem"]["code"] == "account-not-found"
    account = await (await api.get(f"/v1/accounts/{a}", headers=headers(api_key))).json()
    assert account["metadata"] == {"owner": "bob", **full}


# --- list and find -----------------------------------------------------------------------------------------------
async def listing(api: TestClient[Any, Any], key: str, query: str = "") -> tuple[int, dict[str, Any]]:
    response = await api.get(f"/v1/accounts{query}", headers=headers(key))
    return response.status, await response.json(content_type=None)


async def test_accounts_are_listed_filtered_and_paged(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService
) -> None:
    made = [
        await new_account(api, api_key, metadata={"owner": "bob", "tier": "gold"}),
        await new_account(api, api_key, metadata={"owner": "bob"}),
        await new_account(api, api_key, currency="EUR", metadata={"owner": "alice"}),
        await new_account(api, api_key, currency="EUR"),
        await new_account(api, api_key),
    ]
    await status_change(api, api_key, made[1], "freeze")
    status, everything = await listing(api, api_key)
    assert status == 200 and [a["id"] for a in everything["data"]] == made[::-1]  # newest first
    assert everything["has_more"] is False
    _, oldest = await listing(api, api_key, "?order=asc&limit=2")
    assert [a["id"] for a in oldest["data"]] == made[:2] and oldest["has_more"]

    seen, query = [], "?limit=2"
    while True:  # every account once, page by page
        _, page = await listing(api, api_key, query)
        seen += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            break
        query = f"?limit=2&cursor={page['next_cursor']}"
    assert seen == made[::-1]

    assert [a["id"] for a in (await listing(api, api_key, "?currency=EUR"))[1]["data"]] == [made[3], made[2]]
    assert [a["id"] for a in (await listing(api, api_key, "?status=frozen"))[1]["data"]] == [made[1]]
    bobs = (await listing(api, api_key, "?metadata[owner]=bob"))[1]["data"]
    assert [a["id"] for a in bobs] == [made[1], made[0]]
    gold = (await listing(api, api_key, "?metadata[owner]=bob&metadata[tier]=gold&currency=USD"))[1]["data"]
    assert [a["id"] for a in gold] == [made[0]]
    assert (await listing(api, api_key, "?metadata[owner]=carol"))[1]["data"] == []

    other_key = create_api_key(ledger.pool, f"t-{uuid.uuid4().hex[:12]}")[1]
    assert (await listing(api, other_key))[1]["data"] == []  # another tenant sees none of them


async def test_a_cursor_serves_only_its_own_listing(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService
) -> None:
    for _ in range(3):
        await new_account(api, api_key, metadata={"owner": "bob"})
    _, page = await listing(api, api_key, "?limit=1&metadata[owner]=bob")
    cursor = page["next_cursor"]
    assert (await listing(api, api_key, f"?limit=1&metadata[owner]=bob&cursor={cursor}"))[0] == 200
    other_key = create_api_key(ledger.pool, f"t-{uuid.uuid4().hex[:12]}")[1]
    for key, query in [
        (api_key, f"?limit=1&cursor={cursor}"),  # other filters
        (api_key, f"?limit=1&metadata[owner]=bob&order=asc&cursor={cursor}"),  # other order
        (other_key, f"?limit=1&metadata[owner]=bob&cursor={cursor}"),  # another tenant
        (api_key, "?cursor=bm90LWEtY3Vyc29y"),  # made up
    ]:
        status, problem = await listing(api, key, query)
        assert (status, problem["code"]) == (400, "request-invalid"), query
    for query in ["?limit=0", "?status=gone", "?currency=usd", "?unknown=1", "?metadata[a]=1&metadata%5Ba%5D=2"]:
        assert (await listing(api, api_key, query))[0] == 400, query


def test_every_listing_filter_is_backed_by_an_index(settings: Settings) -> None:
    from core.adapters.postgres.migrate import migrate
    from core.adapters.postgres.queries import accounts_query, operations_query, transactions_query
    from core.application.ports import AccountFilters, TransactionFilters

    name = f"{psycopg.conninfo.conninfo_to_dict(settings.database_url)['dbname']}_plans"
    scratch = settings.replace(database_url=psycopg.conninfo.make_conninfo(settings.database_url, dbname=name))
    migrate(scratch)
    try:
        with psycopg.connect(scratch.database_url, autocommit=True) as conn:
            # Tenants of real size, so the planner weighs the indexes as it would in production: 20 tenants of
            # 500 accounts and operations each; one account (of t0) has the owner looked for.
            conn.execute(
                "INSERT INTO accounts (id, tenant_id, currency, kind, overdraft_limit, metadata)"
                " SELECT gen_random_uuid(), 't' || (n % 20), 'USD', 'customer', 0,"
                " jsonb_build_object('owner', CASE WHEN n = 2500 THEN 'bob' ELSE 'owner-' || n END)"
                " FROM generate_series(1, 10000) AS n"
            )
            conn.execute(
                "WITH ops AS (INSERT INTO operations (id, tenant_id, command_type, request)"
                " SELECT gen_random_uuid(), 't' || (n % 20), 'credit', '{}' FROM generate_series(1, 10000) AS n"
                " RETURNING id, tenant_id)"
                " INSERT INTO idempotency_keys (tenant_id, key, fingerprint, operation_id)"
                " SELECT tenant_id, id::text, 'f', id FROM ops"
            )
            conn.execute(
                "WITH tx AS (INSERT INTO transactions (id, tenant_id, kind, operation_id, metadata, created_at)"
                " SELECT gen_random_uuid(), 't' || (n % 20), 'credit', gen_random_uuid(),"
                " jsonb_build_object('owner', CASE WHEN n = 2500 THEN 'bob' ELSE 'owner-' || n END), now()"
                " FROM generate_series(1, 10000) AS n RETURNING id)"
                " SELECT count(*) FROM tx"
            )
            conn.execute(  # one entry per account, on the transaction of the same rank in its tenant
                "WITH a AS (SELECT id, tenant_id, row_number() OVER (PARTITION BY tenant_id ORDER BY id) AS r"
                " FROM accounts), t AS (SELECT id, tenant_id, created_at,"
                " row_number() OVER (PARTITION BY tenant_id ORDER BY id) AS r FROM transactions)"
                " INSERT INTO entries (transaction_id, tenant_id, account_id, sequence, amount, currency,"
                " balance_after, created_at) SELECT t.id, t.tenant_id, a.id, 1, 1, 'USD', 1, t.created_at"
                " FROM t JOIN a ON a.tenant_id = t.tenant_id AND a.r = t.r"
            )
            conn.execute("ANALYZE")
            plans = []
            for filters in (AccountFilters(), AccountFilters(currency="USD", status="open")):
                plans.append(("accounts_tenant_created_idx", *accounts_query("t0", filters, limit=10, cursor=None)))
            metadata = AccountFilters(metadata=(("owner", "bob"),))
            plans.append(("accounts_metadata_idx", *accounts_query("t0", metadata, limit=10, cursor=None)))
            operations, params, _ = operations_query(
                "t0", status="failed", since=None, until=None, limit=10, cursor=None
            )
            plans.append(("idempotency_keys_tenant_created_idx", operations, params))
            plans.append(
                (
                    "transactions_tenant_created_idx",
                    *transactions_query("t0", TransactionFilters(), limit=10, cursor=None),
                )
            )
            by_metadata = TransactionFilters(metadata=(("owner", "bob"),))
            plans.append(("transactions_metadata_idx", *transactions_query("t0", by_metadata, limit=10, cursor=None)))
            by_account = TransactionFilters(account_id=uuid.uuid4())
            plans.append(("entries_account_time_idx", *transactions_query("t0", by_account, limit=10, cursor=None)))
            for index, query, params in plans:
                explained = conn.execute(b"EXPLAIN " + query.as_bytes(conn), params).fetchall()
                plan = "\n".join(row[0] for row in explained)
                assert any(f" using {name} on " in plan.lower() or f"on {name}" in plan for name in index.split("|")), (
                    plan
                )
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_a_transaction_is_found_with_its_entries(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService
) -> None:
    a, b = await new_account(api, api_key), await new_account(api, api_key)
    await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 900, "currency": "USD"})
    _, moved = await post(
        api,
        "/v1/transfers",
        api_key,
        {"source_id": a, "destination_id": b, "amount": 300, "currency": "USD", "metadata": {"ref": "inv-9"}},
    )
    transaction_id = moved["result"]["transaction"]["id"]
    response = await api.get(f"/v1/transactions/{transaction_id}", headers=headers(api_key))
    assert response.status == 200
    found = await response.json()
    assert (found["kind"], found["metadata"], found["operation_id"]) == ("transfer", {"ref": "inv-9"}, moved["id"])
    assert sorted((e["account_id"], e["amount"]) for e in found["entries"]) == sorted([(a, -300), (b, 300)])
    assert found == {**moved["result"]["transaction"], "operation_id": moved["id"]}
    other_key = create_api_key(ledger.pool, f"t-{uuid.uuid4().hex[:12]}")[1]
    for key, target in [(other_key, transaction_id), (api_key, str(uuid.uuid4()))]:
        response = await api.get(f"/v1/transactions/{target}", headers=headers(key))
        assert (response.status, (await response.json())["code"]) == (404, "transaction-not-found")


async def test_operations_are_listed_for_reconciliation(api: TestClient[Any, Any], api_key: str) -> None:
    a = await new_account(api, api_key)
    _, ok = await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 5, "currency": "USD"})
    _, refused = await post(api, "/v1/debits", api_key, {"account_id": a, "amount": 50, "currency": "USD"})
    response = await api.get("/v1/operations", headers=headers(api_key))
    listed = (await response.json())["data"]
    assert [o["status"] for o in listed] == ["succeeded", "succeeded", "failed"]  # oldest first
    assert [o["id"] for o in listed][1:] == [ok["id"], refused["id"]]
    failed = (await (await api.get("/v1/operations?status=failed", headers=headers(api_key))).json())["data"]
    assert [(o["id"], o["problem"]["code"]) for o in failed] == [(refused["id"], "insufficient-funds")]
    page = await (await api.get("/v1/operations?limit=2", headers=headers(api_key))).json()
    rest = await (
        await api.get(f"/v1/operations?limit=2&cursor={page['next_cursor']}", headers=headers(api_key))
    ).json()
    assert [o["id"] for o in page["data"] + rest["data"]] == [o["id"] for o in listed] and not rest["has_more"]
    wrong = await api.get(f"/v1/operations?status=failed&cursor={page['next_cursor']}", headers=headers(api_key))
    assert (wrong.status, (await wrong.json())["code"]) == (400, "request-invalid")
    later = listed[-1]["created_at"]
    since = await (await api.get("/v1/operations", params={"since": later}, headers=headers(api_key))).json()
    assert [o["id"] for o in since["data"]] == [refused["id"]]


async def test_transactions_are_listed_by_account_kind_time_and_metadata(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService
) -> None:
    a, b = await new_account(api, api_key), await new_account(api, api_key)
    made = []
    for path, body in [
        ("/v1/credits", {"account_id": a, "amount": 1_000, "currency": "USD", "metadata": {"batch": "march"}}),
        ("/v1/transfers", {"source_id": a, "destination_id": b, "amount": 300, "currency": "USD"}),
        ("/v1/debits", {"account_id": b, "amount": 100, "currency": "USD", "metadata": {"batch": "march"}}),
        ("/v1/credits", {"account_id": b, "amount": 7, "currency": "USD"}),
    ]:
        status, doc = await post(api, path, api_key, body)
        assert status == 201, doc
        made.append(doc["result"]["transaction"]["id"])

    async def ids(query: str = "", key: str = api_key) -> list[str]:
        response = await api.get(f"/v1/transactions{query}", headers=headers(key))
        assert response.status == 200, await response.text()
        return [t["id"] for t in (await response.json())["data"]]

    assert await ids() == made[::-1]
    assert await ids("?order=asc") == made
    assert await ids(f"?account_id={a}") == [made[1], made[0]]
    assert await ids(f"?account_id={b}&order=asc") == made[1:]
    assert await ids("?kind=credit") == [made[3], made[0]]
    assert await ids("?metadata[batch]=march") == [made[2], made[0]]
    assert await ids(f"?metadata[batch]=march&account_id={b}") == [made[2]]
    first = await (await api.get("/v1/transactions?limit=1&order=asc", headers=headers(api_key))).json()
    assert first["data"][0]["entries"] and first["data"][0]["operation_id"]
    rest = await ids(f"?limit=10&order=asc&cursor={first['next_cursor']}")
    assert rest == made[1:]
    wrong = await api.get(f"/v1/transactions?kind=debit&cursor={first['next_cursor']}", headers=headers(api_key))
    assert (wrong.status, (await wrong.json())["code"]) == (400, "request-invalid")
    other_key = create_api_key(ledger.pool, f"t-{uuid.uuid4().hex[:12]}")[1]
    assert await ids(key=other_key) == [] and await ids(f"?account_id={a}", key=other_key) == []


# --- multi-leg transactions --------------------------------------------------------------------------------------
async def test_a_payment_with_a_fee_split_posts_all_its_legs_at_once(api: TestClient[Any, Any], api_key: str) -> None:
    payer, merchant, fees = [await new_account(api, api_key) for _ in range(3)]
    await post(api, "/v1/credits", api_key, {"account_id": payer, "amount": 10_000, "currency": "USD"})
    legs = [
        {"account_id": payer, "amount": -10_000, "currency": "USD"},
        {"account_id": merchant, "amount": 9_700, "currency": "USD"},
        {"account_id": fees, "amount": 300, "currency": "USD"},
    ]
    status, doc = await post(api, "/v1/transactions", api_key, {"legs": legs, "metadata": {"order": "o-1"}})
    assert status == 201, doc
    transaction = doc["result"]["transaction"]
    assert transaction["kind"] == "multi_leg" and len(transaction["entries"]) == 3
    balances = {a["id"]: a["balance"]["posted"] for a in doc["result"]["accounts"]}
    assert balances == {payer: 0, merchant: 9_700, fees: 300}
    listed = await (await api.get("/v1/transactions?kind=multi_leg", headers=headers(api_key))).json()
    assert [t["id"] for t in listed["data"]] == [transaction["id"]]


async def test_an_exchange_through_liquidity_accounts_balances_per_currency(
    api: TestClient[Any, Any], api_key: str
) -> None:
    alice_usd, alice_eur = await new_account(api, api_key), await new_account(api, api_key, currency="EUR")
    pool_usd, pool_eur = await new_account(api, api_key), await new_account(api, api_key, currency="EUR")
    await post(api, "/v1/credits", api_key, {"account_id": alice_usd, "amount": 1_100, "currency": "USD"})
    await post(api, "/v1/credits", api_key, {"account_id": pool_eur, "amount": 5_000, "currency": "EUR"})
    legs = [
        {"account_id": alice_usd, "amount": -1_100, "currency": "USD"},
        {"account_id": pool_usd, "amount": 1_100, "currency": "USD"},
        {"account_id": pool_eur, "amount": -1_000, "currency": "EUR"},
        {"account_id": alice_eur, "amount": 1_000, "currency": "EUR"},
    ]
    status, doc = await post(api, "/v1/transactions", api_key, {"legs": legs})
    assert (status, doc["status"]) == (201, "succeeded"), doc
    balances = {a["id"]: a["balance"]["posted"] for a in doc["result"]["accounts"]}
    assert balances == {alice_usd: 0, pool_usd: 1_100, pool_eur: 4_000, alice_eur: 1_000}


async def test_a_refused_leg_is_named_and_nothing_posts(api: TestClient[Any, Any], api_key: str) -> None:
    a, b, c = await new_account(api, api_key), await new_account(api, api_key), await new_account(api, api_key)
    await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 100, "currency": "USD"})
    short = [
        {"account_id": a, "amount": -60, "currency": "USD"},
        {"account_id": b, "amount": -60, "currency": "USD"},  # b holds nothing
        {"account_id": c, "amount": 120, "currency": "USD"},
    ]
    _, refused = await post(api, "/v1/transactions", api_key, {"legs": short})
    assert (refused["status"], refused["problem"]["code"], refused["problem"]["leg"]) == (
        "failed",
        "insufficient-funds",
        1,
    )

    def leg(account: str, amount: int) -> dict[str, Any]:
        return {"account_id": account, "amount": amount, "currency": "USD"}

    _, refused = await post(api, "/v1/transactions", api_key, {"legs": [leg(a, -5), leg(str(uuid.uuid4()), 5)]})
    assert (refused["problem"]["code"], refused["problem"]["leg"]) == ("account-not-found", 1)
    account = await (await api.get(f"/v1/accounts/{a}", headers=headers(api_key))).json()
    assert account["balance"]["posted"] == 100  # all or none
    strangers = [leg(str(uuid.uuid4()), 1) for _ in range(101)]
    for legs, code in [
        ([leg(a, -5), leg(b, 4)], "validation-failed"),  # does not sum to zero
        ([leg(a, 5)], "validation-failed"),  # one leg
        ([leg(a, 0), leg(b, 0)], "amount-invalid"),
        ([leg(a, -5), leg(a, 5)], "validation-failed"),  # one account twice
        ([leg(a, -101), *strangers], "validation-failed"),  # 102 legs
    ]:
        response = await api.post("/v1/transactions", json={"legs": legs}, headers=headers(api_key, uuid.uuid4().hex))
        assert (response.status, (await response.json())["code"]) == (422, code), legs[:2]


# --- balances in time --------------------------------------------------------------------------------------------
async def test_a_balance_as_of_any_moment_and_per_bucket(api: TestClient[Any, Any], api_key: str) -> None:
    a = await new_account(api, api_key)
    await post(api, "/v1/credits", api_key, {"account_id": a, "amount": 100, "currency": "USD"})
    await post(api, "/v1/debits", api_key, {"account_id": a, "amount": 30, "currency": "USD"})
    entries = (await (await api.get(f"/v1/accounts/{a}/entries?order=asc", headers=headers(api_key))).json())["data"]
    credited, debited = entries[0]["created_at"], entries[1]["created_at"]

    async def balance(query: str) -> int:
        response = await api.get(f"/v1/accounts/{a}/balance{query}", headers=headers(api_key))
        assert response.status == 200, await response.text()
        posted: int = (await response.json())["posted"]
        return posted

    assert await balance("") == 70  # now
    assert await balance("?" + urlencode({"as_of": credited})) == 100
    assert await balance("?" + urlencode({"as_of": debited})) == 70
    assert await balance("?as_of=2020-01-01T00:00:00Z") == 0  # before the account had any entry

    since = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    response = await api.get(
        f"/v1/accounts/{a}/balance-history?" + urlencode({"interval": "hour", "since": since}), headers=headers(api_key)
    )
    buckets = (await response.json())["data"]
    assert len(buckets) == 3 and [b["closing"] for b in buckets] == [0, 0, 70]
    for query in ["?interval=minute&since=2026-01-01T00:00:00Z", "?interval=hour&since=2020-01-01T00:00:00Z"]:
        assert (await api.get(f"/v1/accounts/{a}/balance-history{query}", headers=headers(api_key))).status == 400
    missing = await api.get(f"/v1/accounts/{uuid.uuid4()}/balance", headers=headers(api_key))
    assert (missing.status, (await missing.json())["code"]) == (404, "account-not-found")
