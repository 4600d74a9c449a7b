"""In-memory adapters that subclass the ports, for testing the use cases without a database."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from core.application.ports import (
    AccountRepository,
    Claim,
    CommandQueue,
    Completion,
    Event,
    ExistingKey,
    HoldKey,
    HoldRepository,
    IdempotencyStore,
    Ledger,
    OperationRecords,
    Outbox,
    PlacedHold,
    Posting,
    QueuedKeys,
    QueueUnavailable,
    StoreUnavailable,
    TransactionKey,
    UnitOfWork,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.model import Account, AccountKey, Hold, Transaction


@dataclass
class Books:
    """What the fake database holds; a unit of work edits a copy and swaps it in on commit."""

    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    holds: dict[HoldKey, Hold] = field(default_factory=dict)
    transactions: list[tuple[Transaction, UUID]] = field(default_factory=list)
    keys: dict[tuple[str, str], tuple[str, OperationResult]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


class FakeAccounts(AccountRepository):
    def __init__(self, books: Books) -> None:
        self.books = books

    def lock(self, keys: Collection[AccountKey]) -> dict[AccountKey, Account]:
        # Copies, as rows read from a database are: the stored account changes only through `save`.
        return {k: copy.copy(a) for k in sorted(keys) if (a := self.books.accounts.get(k))}

    def add(self, accounts: Sequence[Account]) -> None:
        for account in accounts:
            assert account.key not in self.books.accounts, "the use case adds only ids it locked free"
            self.books.accounts[account.key] = account

    def save(self, accounts: Sequence[Account], *, restated: Collection[AccountKey] = ()) -> None:
        for account in accounts:
            stored = self.books.accounts.get(account.key)
            assert stored is not None, "the use case saves only accounts it locked"
            if account.key not in restated:  # as the real store: only balances travel, unless restated
                account = dataclasses.replace(account, status=stored.status, metadata=stored.metadata)
            self.books.accounts[account.key] = account


class FakeHolds(HoldRepository):
    def __init__(self, books: Books) -> None:
        self.books = books

    def lock(self, keys: Collection[HoldKey]) -> dict[HoldKey, Hold]:
        return {k: h for k in sorted(keys) if (h := self.books.holds.get(k))}

    def add(self, placed: Sequence[PlacedHold]) -> None:
        for p in placed:
            assert p.hold.key not in self.books.holds, "the use case adds only holds it locked free"
            self.books.holds[p.hold.key] = p.hold

    def save(self, holds: Sequence[Hold]) -> None:
        for hold in holds:
            assert hold.key in self.books.holds, "the use case saves only holds it locked"
            self.books.holds[hold.key] = hold


class FakeLedger(Ledger):
    def __init__(self, books: Books) -> None:
        self.books = books

    def append(self, postings: Sequence[Posting]) -> None:
        self.books.transactions.extend((p.transaction, p.operation_id) for p in postings)

    def reversed_amounts(self, keys: Collection[TransactionKey]) -> dict[TransactionKey, int]:
        moved: dict[TransactionKey, int] = {}
        for tx, _ in self.books.transactions:
            if tx.reverses is not None and (tx.tenant_id, tx.reverses) in keys:
                moved[(tx.tenant_id, tx.reverses)] = moved.get((tx.tenant_id, tx.reverses), 0) + tx.amount_moved
        return moved


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
        self.holds = FakeHolds(self.working)
        self.idempotency = FakeIdempotency(self.working)
        self.outbox = FakeOutbox(self.working)
        return self

    def find_holds(self, keys: Collection[HoldKey]) -> dict[HoldKey, Hold]:
        return {k: copy.deepcopy(h) for k, h in self.committed_books.holds.items() if k in keys}

    def find_transactions(self, keys: Collection[TransactionKey]) -> dict[TransactionKey, Transaction]:
        return {k: tx for tx, _ in self.committed_books.transactions if (k := (tx.tenant_id, tx.id)) in keys}

    def commit(self) -> None:
        self.committed_books.__dict__.update(copy.deepcopy(self.working).__dict__)
        self.commits += 1

    def rollback(self) -> None:
        pass  # the working copy is simply dropped


# --- the accept phase's ports (async) -------------------------------------------------------------------------
class FakeOperationRecords(OperationRecords):
    """Records in `books.keys`, like the real statement: one call per group, counted."""

    def __init__(self, books: Books) -> None:
        self.books = books
        self.groups: list[int] = []  # size of each recorded group
        self.down = False  # True: the store cannot be reached
        self.refused: set[str] = set()  # keys whose claim the store refuses (as a bad row would be)
        self.age_s = 0.0  # how old every existing key is reported to be, seconds
        self.down_for_withdrawals = False  # True: records work, withdrawals find the store down

    async def record(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        if self.down:
            raise StoreUnavailable("PostgreSQL is down")
        if any(c.key in self.refused for c in claims):
            raise ValueError("the store refused a row")
        self.groups.append(len(claims))
        await asyncio.sleep(0)  # a round trip: other requests gather behind it
        existing = FakeIdempotency(self.books).claim(claims)
        return {k: dataclasses.replace(e, age_s=self.age_s) for k, e in existing.items()}

    async def withdraw(self, claims: Sequence[Claim]) -> None:
        if self.down or self.down_for_withdrawals:
            raise StoreUnavailable("PostgreSQL is down")
        for claim in claims:
            found = self.books.keys.get((claim.tenant_id, claim.key))
            if found and found[1].operation_id == claim.operation_id and not found[1].settled:
                del self.books.keys[(claim.tenant_id, claim.key)]

    async def find(self, tenant_id: str, operation_id: UUID) -> OperationResult | None:
        for (tenant, _), (_, operation) in self.books.keys.items():
            if tenant == tenant_id and operation.operation_id == operation_id:
                return operation
        return None


class FakeCommandQueue(CommandQueue):
    def __init__(self) -> None:
        self.messages: list[list[tuple[UUID, str]]] = []  # each message's (operation id, idempotency key)s
        self.down = False

    @property
    def published(self) -> list[tuple[UUID, str]]:
        return [command for message in self.messages for command in message]

    async def publish(self, claims: Sequence[Claim]) -> None:
        await asyncio.sleep(0)  # the confirm's round trip
        if self.down:
            raise QueueUnavailable("no confirm")
        self.messages.append([(c.operation_id, c.key) for c in claims])


class FakeQueuedKeys(QueuedKeys):
    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], UUID] = {}

    async def remember(self, claims: Sequence[Claim]) -> None:
        for claim in claims:
            self.keys[(claim.tenant_id, claim.key)] = claim.operation_id

    async def queued_operation(self, tenant_id: str, key: str) -> UUID | None:
        return self.keys.get((tenant_id, key))
