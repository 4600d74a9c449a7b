"""In-memory adapters that subclass the ports, for testing the use cases without a database."""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from core.application.commands import Command
from core.application.ports import (
    AccountRepository,
    Event,
    ExistingKey,
    IdempotencyStore,
    Ledger,
    Outbox,
    UnitOfWork,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.ids import external_account_id
from core.domain.model import Account, AccountKind, OverdraftPolicy, Transaction


@dataclass
class Books:
    """What the fake database holds; a unit of work edits a copy and swaps it in on commit."""

    accounts: dict[UUID, Account] = field(default_factory=dict)
    transactions: list[tuple[Transaction, UUID]] = field(default_factory=list)
    keys: dict[tuple[str, str], tuple[str, OperationResult]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


class FakeAccounts(AccountRepository):
    def __init__(self, books: Books) -> None:
        self.books = books

    def add(self, account: Account) -> bool:
        if account.id in self.books.accounts:
            return False
        self.books.accounts[account.id] = account
        return True

    def lock(self, tenant_id: str, ids: Collection[UUID]) -> dict[UUID, Account]:
        return {i: a for i in sorted(ids) if (a := self.books.accounts.get(i)) and a.tenant_id == tenant_id}

    def ensure_external(self, tenant_id: str, currency: str) -> None:
        account_id = external_account_id(tenant_id, currency)
        self.books.accounts.setdefault(
            account_id, Account(account_id, tenant_id, currency, AccountKind.SYSTEM, OverdraftPolicy(None))
        )

    def save_status(self, account: Account) -> None:
        self.books.accounts[account.id] = account


class FakeLedger(Ledger):
    def __init__(self, books: Books) -> None:
        self.books = books

    def append(self, transaction: Transaction, accounts: Sequence[Account], *, operation_id: UUID) -> None:
        self.books.transactions.append((transaction, operation_id))
        for account in accounts:
            self.books.accounts[account.id] = account


class FakeIdempotency(IdempotencyStore):
    def __init__(self, books: Books) -> None:
        self.books = books

    def claim(self, command: Command, *, key: str, fingerprint: str, operation_id: UUID) -> ExistingKey | None:
        found = self.books.keys.get((command.tenant_id, key))
        if found is not None:
            return ExistingKey(found[0], found[1])
        self.books.keys[(command.tenant_id, key)] = (
            fingerprint,
            OperationResult(operation_id, OperationStatus.PENDING),
        )
        return None

    def complete(self, tenant_id: str, key: str, outcome: OperationResult) -> None:
        fingerprint, _ = self.books.keys[(tenant_id, key)]
        self.books.keys[(tenant_id, key)] = (fingerprint, outcome)

    def release(self, tenant_id: str, key: str, operation_id: UUID) -> None:
        found = self.books.keys.get((tenant_id, key))
        if found and found[1].operation_id == operation_id and not found[1].settled:
            del self.books.keys[(tenant_id, key)]


class FakeOutbox(Outbox):
    def __init__(self, books: Books) -> None:
        self.books = books

    def stage(self, event: Event) -> None:
        self.books.events.append(event)


class FakeUnitOfWork(UnitOfWork):
    """All or nothing like the real one: work happens on a deep copy that replaces the books on commit."""

    def __init__(self, books: Books) -> None:
        self.committed_books = books
        self.commits = 0

    def __enter__(self) -> FakeUnitOfWork:
        self.working = copy.deepcopy(self.committed_books)
        self.accounts = FakeAccounts(self.working)
        self.ledger = FakeLedger(self.working)
        self.idempotency = FakeIdempotency(self.working)
        self.outbox = FakeOutbox(self.working)
        return self

    def commit(self) -> None:
        self.committed_books.__dict__.update(copy.deepcopy(self.working).__dict__)
        self.commits += 1

    def rollback(self) -> None:
        pass  # the working copy is simply dropped
