"""Holds (two-phase postings) on the real PostgreSQL: what they set aside, the overdraft rule on what is available,
capture, void and expiry, each exactly once, also when many of them race for one hold."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.verify import verify
from core.application.commands import CaptureHold, ChangeAccountStatus, CreateHold, VoidHold
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService
from core.domain.model import AccountStatus
from core.domain.money import Money
from core.settings import Settings
from ingress.app import init_app
from tests.helpers import balance, credit, debit, key, open_account
from tests.processes import ManagedProcess
from workers.redeliver import HoldExpiry

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def place(
    ledger: LedgerService,
    tenant: str,
    source: UUID,
    destination: UUID,
    amount: int,
    *,
    expires_in_s: float | None = None,
) -> OperationResult:
    expires_at = None if expires_in_s is None else datetime.now(UTC) + timedelta(seconds=expires_in_s)
    hold = CreateHold(tenant, source, destination, Money.for_posting(amount, "USD"), expires_at)
    return ledger.execute(hold, idempotency_key=key())


def hold_of(outcome: OperationResult) -> UUID:
    assert outcome.status is OperationStatus.SUCCEEDED and outcome.result is not None, outcome.problem
    return UUID(outcome.result["hold"]["id"])


def capture(ledger: LedgerService, tenant: str, hold: UUID, amount: int | None = None) -> OperationResult:
    return ledger.execute(CaptureHold(tenant, hold, amount), idempotency_key=key())


def void(ledger: LedgerService, tenant: str, hold: UUID) -> OperationResult:
    return ledger.execute(VoidHold(tenant, hold), idempotency_key=key())


def code_of(outcome: OperationResult) -> str:
    return "ok" if outcome.problem is None else str(outcome.problem["code"])


def balances(ledger: LedgerService, tenant: str, account: UUID) -> tuple[int, int, int, int]:
    found = ledger.queries.account(tenant, account)
    assert found is not None
    return found.balance, found.pending_debits, found.pending_credits, found.available


def books_are_sound(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        assert verify(conn) == []


def funded(ledger: LedgerService, tenant: str, amount: int) -> tuple[UUID, UUID]:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, amount)
    return a, b


def test_a_hold_sets_money_aside_and_the_overdraft_rule_applies_to_what_is_available(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b = funded(ledger, tenant, 100)
    hold = hold_of(place(ledger, tenant, a, b, 70))
    assert balances(ledger, tenant, a) == (100, 70, 0, 30)
    assert balances(ledger, tenant, b) == (0, 0, 70, 0)  # pending credits are not spendable
    assert code_of(debit(ledger, tenant, a, 31)) == "insufficient-funds"  # posted would allow it; available not
    assert code_of(place(ledger, tenant, a, b, 31)) == "insufficient-funds"
    assert code_of(debit(ledger, tenant, a, 30)) == "ok"
    assert code_of(capture(ledger, tenant, hold, 71)) == "capture-exceeds-hold"
    captured = capture(ledger, tenant, hold, 50)  # the 20 not captured are let go
    assert code_of(captured) == "ok" and captured.result is not None
    assert captured.result["hold"]["status"] == "captured"
    assert captured.result["transaction"]["kind"] == "capture"
    assert balances(ledger, tenant, a) == (20, 0, 0, 20)
    assert balances(ledger, tenant, b) == (50, 0, 0, 50)
    assert code_of(capture(ledger, tenant, hold)) == "hold-not-pending"  # never twice
    assert code_of(void(ledger, tenant, hold)) == "hold-not-pending"  # never voided after capture
    assert code_of(capture(ledger, tenant, uuid.uuid4())) == "hold-not-found"
    assert code_of(capture(ledger, f"{tenant}-b", hold)) == "hold-not-found"  # another tenant's
    books_are_sound(settings)


def test_void_releases_and_nothing_follows_it(ledger: LedgerService, tenant: str, settings: Settings) -> None:
    a, b = funded(ledger, tenant, 100)
    hold = hold_of(place(ledger, tenant, a, b, 100))
    assert code_of(ledger.execute(ChangeAccountStatus(tenant, b, AccountStatus.CLOSED), idempotency_key=key())) == (
        "account-has-open-holds"
    )
    voided = void(ledger, tenant, hold)
    assert code_of(voided) == "ok" and voided.result is not None and voided.result["hold"]["status"] == "voided"
    assert balances(ledger, tenant, a) == (100, 0, 0, 100)
    assert code_of(capture(ledger, tenant, hold)) == "hold-not-pending"
    assert code_of(void(ledger, tenant, hold)) == "hold-not-pending"
    assert code_of(ledger.execute(ChangeAccountStatus(tenant, b, AccountStatus.CLOSED), idempotency_key=key())) == "ok"
    books_are_sound(settings)


def test_expiry_releases_a_hold_once_and_a_late_capture_is_refused(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b = funded(ledger, tenant, 100)
    hold = hold_of(place(ledger, tenant, a, b, 60, expires_in_s=0.5))
    later = hold_of(place(ledger, tenant, a, b, 40, expires_in_s=600))
    time.sleep(0.6)
    assert code_of(capture(ledger, tenant, hold)) == "hold-expired"
    sweeps = [HoldExpiry(ledger) for _ in range(2)]
    assert sweeps[0].run_once() >= 1  # (other tests' holds may be due too)
    assert sweeps[1].run_once() == 0  # nothing left: each hold expires once
    assert balances(ledger, tenant, a) == (100, 40, 0, 60)  # only the later hold is still held
    assert code_of(void(ledger, tenant, hold)) == "hold-not-pending"
    assert code_of(capture(ledger, tenant, later)) == "ok"
    books_are_sound(settings)


def race(*calls: Callable[[], OperationResult]) -> list[str]:
    """Run the calls at once, each on its own thread; their outcomes' codes, in call order."""
    outcomes: list[str] = [""] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        outcomes[index] = code_of(calls[index]())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_racing_captures_and_voids_end_a_hold_exactly_once(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    for round_ in range(3):
        a, b = funded(ledger, tenant, 100)
        hold = hold_of(place(ledger, tenant, a, b, 100))
        calls = [lambda h=hold: capture(ledger, tenant, h, 100)] * 8 + [lambda h=hold: void(ledger, tenant, h)] * 8
        codes = race(*calls)
        assert codes.count("ok") == 1, (round_, codes)
        assert set(codes) - {"ok"} == {"hold-not-pending"}, codes
        captured = codes.index("ok") < 8
        assert balances(ledger, tenant, a) == ((0, 0, 0, 0) if captured else (100, 0, 0, 100))
        assert balances(ledger, tenant, b) == ((100, 0, 0, 100) if captured else (0, 0, 0, 0))
    books_are_sound(settings)


def test_racing_captures_and_expiry_end_a_hold_exactly_once(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b = funded(ledger, tenant, 100)
    hold = hold_of(place(ledger, tenant, a, b, 100, expires_in_s=0.3))
    sweep = HoldExpiry(ledger)
    expired: list[int] = []

    def expire() -> OperationResult:
        time.sleep(0.3)
        expired.append(sweep.run_once())
        return OperationResult(uuid.uuid4(), OperationStatus.SUCCEEDED, {})

    def late_capture() -> OperationResult:
        time.sleep(0.25)
        return capture(ledger, tenant, hold)

    codes = race(expire, expire, *[late_capture] * 8)
    captures = codes[2:].count("ok")
    state = ledger.queries.account(tenant, a)
    assert state is not None and state.pending_debits == 0
    if captures:  # a capture got there before the expiry: the money moved once, nothing expired it
        assert captures == 1 and state.balance == 0
    else:
        assert state.balance == 100 and set(codes[2:]) <= {"hold-expired", "hold-not-pending"}
    books_are_sound(settings)


def test_concurrent_holds_never_set_aside_more_than_is_available(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    a, b = funded(ledger, tenant, 100)
    codes = race(*[lambda: place(ledger, tenant, a, b, 10)] * 16)
    assert sorted(codes) == ["insufficient-funds"] * 6 + ["ok"] * 10
    assert balances(ledger, tenant, a) == (100, 100, 0, 0)
    assert balance(ledger, tenant, b) == 0
    books_are_sound(settings)


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings))


async def test_holds_over_http(api: TestClient[Any, Any], ledger: LedgerService, tenant: str) -> None:
    secret = create_api_key(ledger.pool, tenant)[1]
    headers = lambda: {"Authorization": f"Bearer {secret}", "Idempotency-Key": key(), "Prefer": "wait=20"}  # noqa: E731
    a, b = funded(ledger, tenant, 100)
    expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    body = {"source_id": str(a), "destination_id": str(b), "amount": 80, "currency": "USD", "expires_at": expires}
    placed = await api.post("/v1/holds", json=body, headers=headers())
    document = await placed.json()
    assert (placed.status, document["status"]) == (201, "succeeded"), document
    hold = document["result"]["hold"]
    assert (hold["status"], hold["amount"], hold["expires_at"]) == ("pending", 80, expires)
    shown = await (await api.get(f"/v1/holds/{hold['id']}", headers=headers())).json()
    assert shown == hold
    account = await (await api.get(f"/v1/accounts/{a}", headers=headers())).json()
    assert account["balance"] == {"posted": 100, "pending_debits": 80, "pending_credits": 0, "available": 20}
    captured = await (await api.post(f"/v1/holds/{hold['id']}/capture", json={"amount": 30}, headers=headers())).json()
    assert captured["result"]["hold"]["captured_amount"] == 30
    again = await (await api.post(f"/v1/holds/{hold['id']}/void", headers=headers())).json()
    assert (again["status"], again["problem"]["code"]) == ("failed", "hold-not-pending")
    for wrong, code in (
        ({**body, "expires_at": "2026-01-01T00:00:00"}, "validation-failed"),  # no offset
        ({**body, "expires_at": (datetime.now(UTC) + timedelta(days=31)).isoformat()}, "validation-failed"),
        ({**body, "destination_id": str(a)}, "same-account"),
        ({**body, "amount": -5}, "amount-invalid"),
    ):
        refused = await api.post("/v1/holds", json=wrong, headers=headers())
        assert (refused.status, (await refused.json())["code"]) == (422, code), wrong
    missing = await api.get(f"/v1/holds/{uuid.uuid4()}", headers=headers())
    assert (missing.status, (await missing.json())["code"]) == (404, "hold-not-found")


def test_a_refused_capture_leaves_the_hold_as_it_was(ledger: LedgerService, tenant: str, settings: Settings) -> None:
    a, b = funded(ledger, tenant, 100)
    hold = hold_of(place(ledger, tenant, a, b, 40))
    status = lambda s: ledger.execute(ChangeAccountStatus(tenant, b, s), idempotency_key=key())  # noqa: E731
    assert code_of(status(AccountStatus.FROZEN)) == "ok"
    assert code_of(capture(ledger, tenant, hold, 10)) == "account-frozen"
    assert balances(ledger, tenant, a) == (100, 40, 0, 60)
    assert balances(ledger, tenant, b) == (0, 0, 40, 0)
    assert code_of(status(AccountStatus.OPEN)) == "ok"
    assert code_of(capture(ledger, tenant, hold, 10)) == "ok"  # still pending, so capturable
    assert balances(ledger, tenant, a) == (90, 0, 0, 90)
    books_are_sound(settings)
