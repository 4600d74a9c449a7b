"""Small builders shared by the tests."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from uuid import UUID

from core.application.commands import Command, CreateAccount, Credit, Debit, Transfer
from core.application.ports import Claim
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService, ingress_database, operation_records
from core.domain.model import OverdraftPolicy
from core.domain.money import Money


def key() -> str:
    return uuid.uuid4().hex


def open_account(
    ledger: LedgerService, tenant: str, currency: str = "USD", *, overdraft: int = 0, **extra: Any
) -> UUID:
    result = ledger.execute(CreateAccount(tenant, currency, OverdraftPolicy(overdraft), **extra), idempotency_key=key())
    assert result.status is OperationStatus.SUCCEEDED, result.problem
    assert result.result is not None
    return UUID(result.result["account"]["id"])


def credit(ledger: LedgerService, tenant: str, account: UUID, amount: int, currency: str = "USD") -> OperationResult:
    return ledger.execute(Credit(tenant, account, Money.for_posting(amount, currency)), idempotency_key=key())


def debit(ledger: LedgerService, tenant: str, account: UUID, amount: int, currency: str = "USD") -> OperationResult:
    return ledger.execute(Debit(tenant, account, Money.for_posting(amount, currency)), idempotency_key=key())


def transfer(
    ledger: LedgerService, tenant: str, source: UUID, destination: UUID, amount: int, currency: str = "USD"
) -> OperationResult:
    return ledger.execute(
        Transfer(tenant, source, destination, Money.for_posting(amount, currency)), idempotency_key=key()
    )


def balance(ledger: LedgerService, tenant: str, account: UUID) -> int:
    found = ledger.queries.account(tenant, account)
    assert found is not None
    return found.balance


def record_pending(ledger: LedgerService, command: Command, idempotency_key: str, operation_id: UUID) -> None:
    """Record a command as pending the way an ingress does before it publishes (the real adapter and its
    statement), for tests that then publish it themselves, or never do."""

    async def record() -> None:
        database = await ingress_database(ledger.settings)
        try:
            existing = await operation_records(database).record(
                [Claim.for_command(command, idempotency_key, operation_id)]
            )
        finally:
            await database.close()
        assert not existing, f"the key {idempotency_key!r} was already claimed"

    asyncio.run(record())
