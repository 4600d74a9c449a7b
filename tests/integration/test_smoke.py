from __future__ import annotations

from core.bootstrap import LedgerService
from tests.helpers import balance, credit, open_account, transfer


def test_credit_then_transfer_moves_money(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    b = open_account(ledger, tenant)
    r = credit(ledger, tenant, a, 1000)
    assert r.status == "succeeded", r.problem
    r = transfer(ledger, tenant, a, b, 400)
    assert r.status == "succeeded", r.problem
    assert balance(ledger, tenant, a) == 600
    assert balance(ledger, tenant, b) == 400
