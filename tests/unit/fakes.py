"""In-memory adapters that subclass the ports, for testing the use cases without a database."""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from core.application.ports import (
    AccountRepository,
    Claim,
    Completion,
    Event,
    ExistingKey,
    IdempotencyStore,
    Ledger,
    Outbox,
    Posting,
    UnitOfWork,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.model import Account, Transaction


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

    def lock(self, ids: Collection[UUID]) -> dict[UUID, Account]:
        return {i: a for i in sorted(ids) if (a := self.books.accounts.get(i))}

    def add(self, accounts: Sequence[Account]) -> None:
        for account in accounts:
            assert account.id not in self.books.accounts, "the use case adds only ids it locked free"
            self.books.accounts[account.id] = account

    def save(self, accounts: Sequence[Account]) -> None:
        for account in accounts:
            assert account.id in self.books.accounts, "the use case saves only accounts it locked"
            self.books.accounts[account.id] = account


class FakeLedger(Ledger):
    def __init__(self, books: Books) -> None:
        self.books = books

    def append(self, postings: Sequence[Posting]) -> None:
        self.books.transactions.extend((p.transaction, p.operation_id) for p in postings)


class FakeIdempotency(IdempotencyStore):
    def __init__(self, books: Books) -> None:
        self.books = books

    def claim(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        assert len({(c.tenant_id, c.key) for c in claims}) == len(claims), "claimed keys are distinct"
        known: dict[tuple[str, str], ExistingKey] = {}
        for c in claims:
            found = self.books.keys.get((c.tenant_id, c.key))
            if found is not None:
                known[(c.tenant_id, c.key)] = ExistingKey(found[0], found[1])
            else:
                self.books.keys[(c.tenant_id, c.key)] = (
                    c.fingerprint,
                    OperationResult(c.operation_id, OperationStatus.PENDING),
                )
        return known

    def complete(self, completions: Sequence[Completion]) -> None:
        for c in completions:
            fingerprint, _ = self.books.keys[(c.tenant_id, c.key)]
            self.books.keys[(c.tenant_id, c.key)] = (fingerprint, c.outcome)

    def release(self, tenant_id: str, key: str, operation_id: UUID) -> None:
        found = self.books.keys.get((tenant_id, key))
        if found and found[1].operation_id == operation_id and not found[1].settled:
            del self.books.keys[(tenant_id, key)]


class FakeOutbox(Outbox):
    def __init__(self, books: Books) -> None:
        self.books = books

    def stage(self, events: Sequence[Event]) -> None:
        self.books.events.extend(events)


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
