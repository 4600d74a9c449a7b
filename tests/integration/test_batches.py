"""Batches (`POST /v1/batches`): up to 1,000 independent commands under one idempotency key, each settling on its
own in the order given, all in one commit, with every item's outcome in the batch's operation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.db import PREDICATE_LOCK_PAGES_NEEDED, predicate_lock_pages
from core.adapters.postgres.verify import verify
from core.application.commands import MAX_BATCH_ITEMS
from core.bootstrap import LedgerService
from core.settings import Settings
from ingress.app import init_app
from tests.helpers import balance
from tests.processes import ManagedProcess
from workers.consumer import warn_if_predicate_locks_too_few

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings))


@pytest.fixture
def api_key(ledger: LedgerService, tenant: str) -> str:
    return create_api_key(ledger.pool, tenant)[1]


def headers(api_key: str, key: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Idempotency-Key": key or uuid.uuid4().hex, "Prefer": "wait=20"}


async def test_each_item_settles_on_its_own_in_order_in_one_operation(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b, nowhere = (str(uuid.uuid4()) for _ in range(3))
    items = [
        {"type": "create_account", "currency": "USD", "id": a},
        {"type": "create_account", "currency": "USD", "id": b, "overdraft_limit": 10},
        {"type": "credit", "account_id": a, "amount": 100, "currency": "USD"},  # sees a, created just before
        {"type": "transfer", "source_id": a, "destination_id": b, "amount": 60, "currency": "USD"},
        {"type": "debit", "account_id": a, "amount": 41, "currency": "USD"},  # 40 left: refused
        {"type": "transfer", "source_id": b, "destination_id": nowhere, "amount": 1, "currency": "USD"},
        {"type": "create_account", "currency": "USD", "id": a},  # taken a moment ago
        {
            "type": "post_transaction",
            "legs": [
                {"account_id": b, "amount": -70, "currency": "USD"},  # 60 + overdraft 10: exactly enough
                {"account_id": a, "amount": 70, "currency": "USD"},
            ],
        },
    ]
    response = await api.post("/v1/batches", json={"items": items}, headers=headers(api_key))
    document = await response.json()
    assert (response.status, document["status"]) == (201, "succeeded"), document
    outcomes = document["result"]["items"]
    assert [o["status"] for o in outcomes] == [
        "succeeded", "succeeded", "succeeded", "succeeded", "failed", "failed", "failed", "succeeded",
    ]  # fmt: skip
    assert [o["problem"]["code"] for o in outcomes if o["status"] == "failed"] == [
        "insufficient-funds",
        "account-not-found",
        "account-exists",
    ]
    assert outcomes[3]["result"]["transaction"]["kind"] == "transfer"
    assert (balance(ledger, tenant, uuid.UUID(a)), balance(ledger, tenant, uuid.UUID(b))) == (110, -10)
    # One operation, one idempotency key, one commit: every posting of the batch shares them.
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT count(DISTINCT t.operation_id), count(*), count(DISTINCT t.xmin::text) FROM transactions t"
            " WHERE t.tenant_id = %s",
            (tenant,),
        ).fetchone()
        assert rows == (1, 3, 1)  # the credit, the transfer and the two-leg transaction
        events = conn.execute(
            "SELECT event_type, payload FROM outbox WHERE tenant_id = %s AND event_type NOT LIKE 'admin.%%'"
            " ORDER BY position",
            (tenant,),
        ).fetchall()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        assert verify(conn) == []
    # One event for the whole batch, its snapshot: the request and every item's outcome as answered.
    assert [t for t, _ in events] == ["batch.settled"]
    snapshot = events[0][1]
    assert (snapshot["operation_id"], snapshot["items"]) == (document["id"], outcomes)
    assert snapshot["request"]["items"][0]["account_id"] == a
    assert "accounts" not in outcomes[2]["result"]  # an item's entries carry its balances
    assert outcomes[2]["result"]["transaction"]["entries"][-1]["balance_after"] == 100
    # The same key again replays the same outcome, and settles nothing more.
    key = uuid.uuid4().hex
    credit_both = {"items": [{"type": "credit", "account_id": x, "amount": 5, "currency": "USD"} for x in (a, b)]}
    first = await (await api.post("/v1/batches", json=credit_both, headers=headers(api_key, key))).json()
    again = await api.post("/v1/batches", json=credit_both, headers=headers(api_key, key))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["result"] == first["result"]
    assert (balance(ledger, tenant, uuid.UUID(a)), balance(ledger, tenant, uuid.UUID(b))) == (115, -5)


async def test_a_full_batch_settles_and_a_larger_one_is_refused(
    api: TestClient[Any, Any], api_key: str, ledger: LedgerService, tenant: str
) -> None:
    accounts = [str(uuid.uuid4()) for _ in range(10)]
    opened = [{"type": "create_account", "currency": "EUR", "id": x, "overdraft_limit": 10_000} for x in accounts]
    await api.post("/v1/batches", json={"items": opened}, headers=headers(api_key))
    transfers = [
        {"type": "transfer", "source_id": accounts[i % 10], "destination_id": accounts[(i + 3) % 10],
         "amount": i + 1, "currency": "EUR", "metadata": {"order": f"order-{i:04d}"}}
        for i in range(MAX_BATCH_ITEMS)
    ]  # fmt: skip
    body = json.dumps({"items": transfers}).encode()
    assert len(body) > 64 * 1024  # past the cap of one command's body, within a batch's
    response = await api.post(
        "/v1/batches", data=body, headers={**headers(api_key), "Content-Type": "application/json"}
    )
    document = await response.json()
    assert document["status"] == "succeeded", document
    assert {o["status"] for o in document["result"]["items"]} == {"succeeded"}
    net = {x: 0 for x in accounts}
    for t in transfers:
        net[t["source_id"]] -= t["amount"]
        net[t["destination_id"]] += t["amount"]
    assert {x: balance(ledger, tenant, uuid.UUID(x)) for x in accounts} == net
    too_many = {"items": transfers + transfers[:1]}
    refused = await api.post("/v1/batches", json=too_many, headers=headers(api_key))
    assert (refused.status, (await refused.json())["code"]) == (422, "validation-failed")


@pytest.mark.parametrize(
    ("items", "code", "item"),
    [
        ([], "validation-failed", None),
        ([{"type": "batch", "items": []}], "validation-failed", None),
        ([{"type": "change_account_status", "account_id": str(uuid.uuid4()), "status": "frozen"}],
         "validation-failed", None),
        ([{"type": "credit", "account_id": str(uuid.uuid4()), "amount": 1, "currency": "USD", "tenant_id": "other"}],
         "validation-failed", None),
        ([{"type": "credit", "account_id": str(uuid.uuid4()), "amount": 1, "currency": "USD"},
          {"type": "credit", "account_id": str(uuid.uuid4()), "amount": 1, "currency": "XYZ"}], "currency-invalid", 1),
        ([{"type": "credit", "account_id": str(uuid.uuid4()), "amount": 0, "currency": "USD"}], "amount-invalid", 0),
    ],
)  # fmt: skip
async def test_an_invalid_item_refuses_the_whole_batch_naming_it(
    api: TestClient[Any, Any], api_key: str, items: list[dict[str, Any]], code: str, item: int | None
) -> None:
    response = await api.post("/v1/batches", json={"items": items}, headers=headers(api_key))
    document = await response.json()
    assert (response.status, response.content_type, document["code"]) == (422, "application/problem+json", code)
    assert document.get("item") == item
    # Over the cap of a batch's body: 413 before anything is parsed.
    huge = b'{"items": [' + b" " * (1024 * 1024) + b"]}"
    too_big = await api.post("/v1/batches", data=huge, headers={**headers(api_key), "Content-Type": "application/json"})
    assert (too_big.status, (await too_big.json())["code"]) == (413, "payload-too-large")


def test_a_worker_says_when_the_server_s_predicate_locks_are_too_few_for_batches(ledger: LedgerService) -> None:
    with ledger.pool.connection() as conn:
        relation, transaction = (
            int(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("max_pred_locks_per_relation", "max_pred_locks_per_transaction")
        )
    pages = relation if relation >= 0 else transaction // -relation
    assert predicate_lock_pages(ledger.pool) == pages
    with capture_logs() as logs:
        warn_if_predicate_locks_too_few(ledger.pool)
    warned = [e for e in logs if e["event"] == "worker.predicate_locks_too_few"]
    assert bool(warned) == (pages < PREDICATE_LOCK_PAGES_NEEDED)
