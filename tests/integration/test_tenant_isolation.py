"""Tenant boundaries, route by route: tenant B, holding every id tenant A has (account, operation, transaction,
webhook endpoint, delivery), can read, change or even learn the existence of none of it. A new route with an id
in its path must be added to `ROUTES`, or `test_every_route_with_an_id_is_in_the_matrix` fails."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.verify import verify
from core.bootstrap import LedgerService
from core.settings import Settings
from ingress.app import init_app
from ingress.routes import routes
from tests.processes import ManagedProcess

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

# (method, path) of every route that names a resource; `{...}` are tenant A's ids. Queued commands answer with
# their operation: B's fails as `account-not-found`, the same as for an id that exists nowhere.
ROUTES: list[tuple[str, str]] = [
    ("GET", "/v1/accounts/{account_id}"),
    ("GET", "/v1/accounts/{account_id}/entries"),
    ("GET", "/v1/accounts/{account_id}/balance"),
    ("GET", "/v1/accounts/{account_id}/balance-history"),
    ("PATCH", "/v1/accounts/{account_id}"),
    ("POST", "/v1/accounts/{account_id}/freeze"),
    ("POST", "/v1/accounts/{account_id}/unfreeze"),
    ("POST", "/v1/accounts/{account_id}/close"),
    ("GET", "/v1/operations/{operation_id}"),
    ("GET", "/v1/operations/{operation_id}/audit"),
    ("GET", "/v1/transactions/{transaction_id}"),
    ("POST", "/v1/transactions/{transaction_id}/reverse"),
    ("GET", "/v1/holds/{hold_id}"),
    ("POST", "/v1/holds/{hold_id}/capture"),
    ("POST", "/v1/holds/{hold_id}/void"),
    ("GET", "/v1/webhook-endpoints/{endpoint_id}"),
    ("DELETE", "/v1/webhook-endpoints/{endpoint_id}"),
    ("POST", "/v1/webhook-endpoints/{endpoint_id}/roll-secret"),
    ("GET", "/v1/webhook-endpoints/{endpoint_id}/deliveries"),
    ("GET", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}"),
    ("POST", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/resend"),
]


def test_every_route_with_an_id_is_in_the_matrix() -> None:
    named = {
        (route.method, route.path)  # type: ignore[attr-defined]
        for route in routes
        if "{" in route.path and route.path.startswith("/v1/")  # type: ignore[attr-defined]
    }
    assert named == set(ROUTES)  # (the docs' assets and the problem pages are the same for everyone)


# What a route needs beyond its path to get past validation, so the matrix tests the boundary, not the parser.
QUERIES = {"/v1/accounts/{account_id}/balance-history": "?interval=day&since=2026-01-01T00:00:00Z"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=10"}


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings.replace(webhook_allowed_networks="127.0.0.0/8")))


async def a_world(api: TestClient[Any, Any], key: str) -> dict[str, str]:
    """Tenant A's resources: an account with money, its operation and transaction, a webhook endpoint."""
    created = await (await api.post("/v1/accounts", json={"currency": "USD"}, headers=auth(key))).json()
    account = created["result"]["account"]["id"]
    credit = await (
        await api.post("/v1/credits", json={"account_id": account, "amount": 50, "currency": "USD"}, headers=auth(key))
    ).json()
    other = (await (await api.post("/v1/accounts", json={"currency": "USD"}, headers=auth(key))).json())["result"]
    held = {"source_id": account, "destination_id": other["account"]["id"], "amount": 5, "currency": "USD"}
    hold = await (await api.post("/v1/holds", json=held, headers=auth(key))).json()
    endpoint = await (
        await api.post(
            "/v1/webhook-endpoints",
            json={"url": "http://127.0.0.1:9/hook", "event_types": ["*"]},
            headers={"Authorization": f"Bearer {key}"},
        )
    ).json()
    return {
        "account_id": account,
        "operation_id": credit["id"],
        "transaction_id": credit["result"]["transaction"]["id"],
        "endpoint_id": endpoint["id"],
        "hold_id": hold["result"]["hold"]["id"],
        "delivery_id": str(uuid.uuid4()),  # B cannot even reach A's endpoint, whatever delivery it names
    }


async def test_another_tenant_can_touch_nothing_by_id(
    api: TestClient[Any, Any], ledger: LedgerService, tenant: str
) -> None:
    a_key = create_api_key(ledger.pool, tenant)[1]
    b_key = create_api_key(ledger.pool, f"{tenant}-b")[1]
    ids = await a_world(api, a_key)
    nowhere = {name: str(uuid.uuid4()) for name in ids}
    for method, template in ROUTES:
        answers = []
        for world in (ids, nowhere):  # B on A's ids, and B on ids that exist nowhere: the same answers
            body = {"metadata": {"owner": "mallory"}} if method == "PATCH" else None
            path = template.format(**world) + QUERIES.get(template, "")
            response = await api.request(method, path, json=body, headers=auth(b_key))
            document = await response.json(content_type=None)
            code = document.get("code") or (document.get("problem") or {}).get("code")
            answers.append((response.status, code))
        assert answers[0] == answers[1], (method, template, answers)
        assert answers[0][1] in {
            "account-not-found",
            "operation-not-found",
            "transaction-not-found",
            "hold-not-found",
            "not-found",
        } or (answers[0][0] == 404), (method, template, answers)
    # And A's world is as A left it.
    account = await (await api.get(f"/v1/accounts/{ids['account_id']}", headers=auth(a_key))).json()
    assert (account["status"], account["balance"]["posted"], account["metadata"]) == ("open", 50, {})
    assert account["balance"]["pending_debits"] == 5
    hold = await (await api.get(f"/v1/holds/{ids['hold_id']}", headers=auth(a_key))).json()
    assert hold["status"] == "pending"
    endpoint = await api.get(f"/v1/webhook-endpoints/{ids['endpoint_id']}", headers=auth(a_key))
    assert endpoint.status == 200


async def test_listings_show_only_the_callers_own(
    api: TestClient[Any, Any], ledger: LedgerService, tenant: str
) -> None:
    a_key = create_api_key(ledger.pool, tenant)[1]
    b_key = create_api_key(ledger.pool, f"{tenant}-b")[1]
    ids = await a_world(api, a_key)
    for path in ["/v1/accounts", "/v1/operations", "/v1/transactions", "/v1/webhook-endpoints", "/v1/events"]:
        mine = await (await api.get(path, headers=auth(a_key))).json()
        theirs = await (await api.get(path, headers=auth(b_key))).json()
        assert mine["data"], path
        assert theirs["data"] == [], path
    query = f"/v1/transactions?account_id={ids['account_id']}"
    assert (await (await api.get(query, headers=auth(b_key))).json())["data"] == []
    pattern = re.compile("|".join(re.escape(v) for v in ids.values()))
    for path in ["/v1/accounts", "/v1/operations", "/v1/transactions", "/v1/events"]:
        assert not pattern.search(await (await api.get(path, headers=auth(b_key))).text()), path


async def test_an_account_id_another_tenant_holds_answers_as_a_free_one(
    api: TestClient[Any, Any], ledger: LedgerService, tenant: str
) -> None:
    a_key = create_api_key(ledger.pool, tenant)[1]
    b_key = create_api_key(ledger.pool, f"{tenant}-b")[1]
    ids = await a_world(api, a_key)
    taken, free = ids["account_id"], str(uuid.uuid4())
    answers = []
    for chosen in (taken, free):  # B picks A's id, then an id nobody holds: the same answer
        response = await api.post("/v1/accounts", json={"currency": "EUR", "id": chosen}, headers=auth(b_key))
        document = await response.json()
        answers.append((response.status, document["status"], document["result"]["account"]["id"] == chosen))
    assert answers[0] == answers[1] == (answers[1][0], "succeeded", True)
    # B's account and A's share an id and nothing else: balances, entries and listings stay apart.
    credit = {"account_id": taken, "amount": 7, "currency": "EUR"}
    assert (await (await api.post("/v1/credits", json=credit, headers=auth(b_key))).json())["status"] == "succeeded"
    mine = await (await api.get(f"/v1/accounts/{taken}", headers=auth(a_key))).json()
    theirs = await (await api.get(f"/v1/accounts/{taken}", headers=auth(b_key))).json()
    assert (mine["currency"], mine["balance"]["posted"]) == ("USD", 50)
    assert (theirs["currency"], theirs["balance"]["posted"]) == ("EUR", 7)
    for key, amounts in ((a_key, [50]), (b_key, [7])):
        entries = await (await api.get(f"/v1/accounts/{taken}/entries", headers=auth(key))).json()
        assert [e["amount"] for e in entries["data"]] == amounts
        listed = await (await api.get(f"/v1/transactions?account_id={taken}", headers=auth(key))).json()
        assert len(listed["data"]) == 1
    # Within one tenant an id is still unique.
    again = await api.post("/v1/accounts", json={"currency": "USD", "id": taken}, headers=auth(a_key))
    assert (await again.json())["problem"]["code"] == "account-exists"
    with ledger.pool.connection() as conn:
        assert verify(conn) == []
