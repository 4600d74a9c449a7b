"""Reversals (`POST /v1/transactions/{id}/reverse`): the mirror of a transaction, in full or in part, linked to it,
never moving more in total than the original did, whatever runs at the same time."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.verify import verify
from core.application.commands import Leg, PostTransaction, ReverseTransaction
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService
from core.domain.ids import external_account_id
from core.settings import Settings
from ingress.app import init_app
from tests.helpers import balance, credit, debit, key, open_account, transfer
from tests.processes import ManagedProcess

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def reverse(ledger: LedgerService, tenant: str, transaction: UUID, amount: int | None = None) -> OperationResult:
    return ledger.execute(ReverseTransaction(tenant, transaction, amount), idempotency_key=key())


def transaction_of(outcome: OperationResult) -> UUID:
    assert outcome.status is OperationStatus.SUCCEEDED and outcome.result is not None, outcome.problem
    return UUID(outcome.result["transaction"]["id"])


def code_of(outcome: OperationResult) -> str | None:
    return None if outcome.problem is None else outcome.problem["code"]


def books_are_sound(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        assert verify(conn) == []


def test_partial_reversals_add_up_to_the_original_and_no_more(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 100)
    original = transaction_of(transfer(ledger, tenant, a, b, 100))
    first = reverse(ledger, tenant, original, 30)
    assert first.result is not None and first.result["transaction"]["reverses"] == str(original)
    assert first.result["transaction"]["kind"] == "reversal"
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (30, 70)
    assert transaction_of(reverse(ledger, tenant, original, 50))
    too_much = reverse(ledger, tenant, original, 21)
    assert code_of(too_much) == "reversal-exceeds-original"
    assert too_much.problem is not None and too_much.problem["remaining"] == 20
    assert transaction_of(reverse(ledger, tenant, original))  # no amount: the 20 left
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (100, 0)
    assert code_of(reverse(ledger, tenant, original)) == "reversal-exceeds-original"  # nothing left
    books_are_sound(settings)


def test_credits_and_debits_reverse_through_the_external_account(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    credited = transaction_of(credit(ledger, tenant, a, 80))
    debited = transaction_of(debit(ledger, tenant, a, 30))
    external = external_account_id(tenant, "USD")
    assert transaction_of(reverse(ledger, tenant, debited))  # the 30 come back
    assert (balance(ledger, tenant, a), balance(ledger, tenant, external)) == (80, -80)
    assert transaction_of(reverse(ledger, tenant, credited, 80))
    assert (balance(ledger, tenant, a), balance(ledger, tenant, external)) == (0, 0)


def test_what_cannot_be_reversed(ledger: LedgerService, tenant: str) -> None:
    a, b, c = (open_account(ledger, tenant, overdraft=1000) for _ in range(3))
    legs = (Leg(a, -50, "USD"), Leg(b, 30, "USD"), Leg(c, 20, "USD"))
    split = transaction_of(ledger.execute(PostTransaction(tenant, legs), idempotency_key=key()))
    assert code_of(reverse(ledger, tenant, split, 10)) == "transaction-not-reversible"  # three entries: all or none
    reversal = transaction_of(reverse(ledger, tenant, split))
    assert [balance(ledger, tenant, x) for x in (a, b, c)] == [0, 0, 0]
    assert code_of(reverse(ledger, tenant, reversal)) == "transaction-not-reversible"  # a reversal's reversal
    assert code_of(reverse(ledger, tenant, uuid.uuid4())) == "transaction-not-found"
    assert code_of(reverse(ledger, f"{tenant}-b", split)) == "transaction-not-found"  # another tenant's
    # A reversal obeys the accounts' rules like any posting: b spent what it received, so it cannot give it back.
    d = open_account(ledger, tenant)
    credit(ledger, tenant, b, 40)
    paid = transaction_of(transfer(ledger, tenant, b, d, 40))
    transfer(ledger, tenant, d, a, 40)
    assert code_of(reverse(ledger, tenant, paid)) == "insufficient-funds"


def test_concurrent_reversals_never_move_more_than_the_original(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 100)
    original = transaction_of(transfer(ledger, tenant, a, b, 100))
    outcomes: list[OperationResult] = []
    start = threading.Barrier(24)

    def one() -> None:
        start.wait()
        outcomes.append(reverse(ledger, tenant, original, 10))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(code_of(o) or "ok" for o in outcomes) == ["ok"] * 10 + ["reversal-exceeds-original"] * 14
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (100, 0)
    books_are_sound(settings)


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings))


async def test_reverse_over_http_and_in_a_batch(api: TestClient[Any, Any], ledger: LedgerService, tenant: str) -> None:
    secret = create_api_key(ledger.pool, tenant)[1]

    def headers(idempotency_key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}", "Idempotency-Key": idempotency_key or key(), "Prefer": "wait=20"}

    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 100)
    original = transaction_of(transfer(ledger, tenant, a, b, 100))
    path = f"/v1/transactions/{original}/reverse"
    k = key()
    first = await api.post(path, json={"amount": 25, "metadata": {"reason": "refund"}}, headers=headers(k))
    document = await first.json()
    assert (first.status, document["status"]) == (201, "succeeded"), document
    again = await api.post(path, json={"amount": 25, "metadata": {"reason": "refund"}}, headers=headers(k))
    assert again.headers["Idempotent-Replayed"] == "true"  # the same key settles once
    reversal = document["result"]["transaction"]["id"]
    shown = await (await api.get(f"/v1/transactions/{reversal}", headers=headers())).json()
    assert (shown["kind"], shown["reverses"], shown["metadata"]) == ("reversal", str(original), {"reason": "refund"})
    items = [{"type": "reverse_transaction", "transaction_id": str(original), "amount": 50} for _ in range(2)]
    batch = await (await api.post("/v1/batches", json={"items": items}, headers=headers())).json()
    assert [i["status"] for i in batch["result"]["items"]] == ["succeeded", "failed"]  # 75 + 50 > 100
    assert batch["result"]["items"][1]["problem"]["remaining"] == 25
    empty = await (await api.post(path, headers=headers())).json()  # no body: all that is left
    assert empty["status"] == "succeeded" and empty["result"]["transaction"]["entries"][0]["amount"] in (25, -25)
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (100, 0)
    invalid = await api.post(path, json={"amount": 0}, headers=headers())
    assert (invalid.status, (await invalid.json())["code"]) == (422, "amount-invalid")
