"""Group settlement on in-memory fakes: order, duplicates, isolation of a poison command, outages."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from uuid import UUID

import pytest

from core.application.commands import (
    Batch,
    ChangeAccountStatus,
    Command,
    CreateAccount,
    Credit,
    Debit,
    Transfer,
    UpdateAccountMetadata,
)
from core.application.group_commit import Unsettled, settle_group
from core.application.ports import Posting, StoreUnavailable, Submission
from core.application.retry import RetryPolicy
from core.application.settle import POSTINGS_PER_STATEMENT, settle
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import IdempotencyKeyReused
from core.domain.ids import new_id
from core.domain.model import Account, AccountKey, AccountStatus
from core.domain.money import Money
from tests.unit.fakes import Books, FakeAccounts, FakeLedger, FakeUnitOfWork


def usd(amount: int) -> Money:
    return Money.for_posting(amount, "USD")


def submit(command: Command, key: str) -> Submission:
    return Submission(command, key, new_id())


@pytest.fixture
def books() -> Books:
    return Books()


@pytest.fixture
def account(books: Books) -> UUID:
    [opened] = settle([submit(CreateAccount("acme", "USD"), "open")], uow=FakeUnitOfWork(books))
    assert isinstance(opened, OperationResult) and opened.result is not None
    return UUID(opened.result["account"]["id"])


def test_each_command_sees_what_the_earlier_ones_of_its_group_left(books: Books, account: UUID) -> None:
    uow = FakeUnitOfWork(books)
    answers = settle(
        [
            submit(Debit("acme", account, usd(5)), "d1"),  # nothing there yet: refused
            submit(Credit("acme", account, usd(10)), "c1"),
            submit(Debit("acme", account, usd(7)), "d2"),  # sees the credit
        ],
        uow=uow,
    )
    assert [a.status for a in answers if isinstance(a, OperationResult)] == [
        OperationStatus.FAILED,
        OperationStatus.SUCCEEDED,
        OperationStatus.SUCCEEDED,
    ]
    assert uow.commits == 1
    assert books.accounts[("acme", account)].balance == 3
    assert [tx.kind for tx, _ in books.transactions] == ["credit", "debit"]


def test_a_status_and_metadata_changed_beside_postings_are_stored_with_the_balance(books: Books, account: UUID) -> None:
    settle(
        [
            submit(Credit("acme", account, usd(10)), "c"),
            submit(ChangeAccountStatus("acme", account, AccountStatus.FROZEN), "f"),
            submit(Credit("acme", account, usd(5)), "refused: frozen"),
        ],
        uow=FakeUnitOfWork(books),
    )
    stored = books.accounts[("acme", account)]
    assert (stored.balance, stored.status) == (10, AccountStatus.FROZEN)
    settle(
        [
            submit(ChangeAccountStatus("acme", account, AccountStatus.OPEN), "o"),
            submit(UpdateAccountMetadata("acme", account, {"team": "payments"}), "m"),
            submit(Debit("acme", account, usd(1)), "d"),
        ],
        uow=FakeUnitOfWork(books),
    )
    settle([submit(UpdateAccountMetadata("acme", account, {"desk": "fx"}), "m2")], uow=FakeUnitOfWork(books))
    stored = books.accounts[("acme", account)]
    assert (stored.balance, stored.status) == (9, AccountStatus.OPEN)
    assert stored.metadata == {"team": "payments", "desk": "fx"}


def test_a_batch_sends_its_postings_in_chunks_as_it_goes_all_in_one_commit(books: Books) -> None:
    opened = settle([submit(CreateAccount("acme", "USD"), f"open-{n}") for n in range(2)], uow=FakeUnitOfWork(books))
    source, destination = (
        UUID(a.result["account"]["id"]) for a in opened if isinstance(a, OperationResult) and a.result
    )
    settle([submit(Credit("acme", source, usd(1_000_000)), "fund")], uow=FakeUnitOfWork(books))
    count = 2 * POSTINGS_PER_STATEMENT + 7
    appended: list[int] = []
    saved: list[int] = []

    class CountingLedger(FakeLedger):
        def append(self, postings: Sequence[Posting]) -> None:
            appended.append(len(postings))
            super().append(postings)

    class CountingAccounts(FakeAccounts):
        def save(self, accounts: Sequence[Account], *, restated: Collection[AccountKey] = ()) -> None:
            saved.append(len(accounts))
            super().save(accounts, restated=restated)

    class CountingUnitOfWork(FakeUnitOfWork):
        def __enter__(self) -> FakeUnitOfWork:
            super().__enter__()
            self.ledger = CountingLedger(self.working)
            self.accounts = CountingAccounts(self.working)
            return self

    uow = CountingUnitOfWork(books)
    items = tuple(Transfer("acme", source, destination, usd(n + 1), {}) for n in range(count))
    [batch] = settle([submit(Batch("acme", items), "batch")], uow=uow)
    assert isinstance(batch, OperationResult) and batch.status is OperationStatus.SUCCEEDED
    assert appended == [POSTINGS_PER_STATEMENT, POSTINGS_PER_STATEMENT, 7] and uow.commits == 1
    assert saved == [2, 2, 2]  # the balances each chunk left, sent with it: the last save stands
    posted = [tx for tx, _ in books.transactions if tx.kind == "transfer"]
    assert [tx.entries[1].amount for tx in posted] == list(range(1, count + 1))  # all of them, in order
    assert books.accounts[("acme", destination)].balance == count * (count + 1) // 2


def test_a_key_twice_in_a_group_settles_once_and_a_reused_key_is_refused_alone(books: Books, account: UUID) -> None:
    credit = Credit("acme", account, usd(4))
    first, again, reused, other = settle(
        [
            submit(credit, "k"),
            submit(credit, "k"),
            submit(Debit("acme", account, usd(4)), "k"),
            submit(Credit("acme", account, usd(1)), "other"),
        ],
        uow=FakeUnitOfWork(books),
    )
    assert isinstance(first, OperationResult) and isinstance(again, OperationResult)
    assert (again.operation_id, again.replayed, first.replayed) == (first.operation_id, True, False)
    assert isinstance(reused, IdempotencyKeyReused)
    assert isinstance(other, OperationResult) and other.status is OperationStatus.SUCCEEDED
    assert books.accounts[("acme", account)].balance == 5
    assert len(books.transactions) == 2


class PoisonedLedger(FakeLedger):
    """Fails to append any posting whose metadata says so, like a constraint one command trips."""

    def append(self, postings: Sequence[Posting]) -> None:
        if any("poison" in p.transaction.metadata for p in postings):
            raise RuntimeError("poisoned posting")
        super().append(postings)


class PoisonedUnitOfWork(FakeUnitOfWork):
    def __enter__(self) -> PoisonedUnitOfWork:
        super().__enter__()
        self.ledger = PoisonedLedger(self.working)
        return self


def test_a_poison_command_is_split_off_and_the_rest_of_its_group_commits(books: Books, account: UUID) -> None:
    group = [submit(Credit("acme", account, usd(n)), f"c{n}") for n in range(1, 8)]
    group.insert(5, submit(Credit("acme", account, usd(100), metadata={"poison": "yes"}), "bad"))
    uows: list[PoisonedUnitOfWork] = []

    def unit_of_work() -> PoisonedUnitOfWork:
        uows.append(PoisonedUnitOfWork(books))
        return uows[-1]

    outcomes = settle_group(group, uow_factory=unit_of_work, retry=RetryPolicy(max_attempts=2))
    assert isinstance(outcomes[5], Unsettled)
    assert str(outcomes[5].error) == "poisoned posting"
    assert all(isinstance(o, OperationResult) and o.status is OperationStatus.SUCCEEDED for o in outcomes[:5])
    assert all(isinstance(o, OperationResult) and o.status is OperationStatus.SUCCEEDED for o in outcomes[6:])
    assert books.accounts[("acme", account)].balance == sum(range(1, 8))
    assert ("acme", "bad") not in books.keys  # nothing of it was committed
    # Halves down to the poison alone: fewer commits than commands, more than one.
    assert 1 < sum(u.commits for u in uows) < len(group)


class UnreachableUnitOfWork(FakeUnitOfWork):
    def __enter__(self) -> UnreachableUnitOfWork:
        raise StoreUnavailable("PostgreSQL is unavailable: OperationalError")


def test_an_unreachable_database_is_nobody_s_fault_and_the_group_is_not_split(books: Books, account: UUID) -> None:
    made: list[FakeUnitOfWork] = []

    def unit_of_work() -> FakeUnitOfWork:
        made.append(UnreachableUnitOfWork(books))
        return made[-1]

    group = [submit(Credit("acme", account, usd(n)), f"c{n}") for n in range(1, 5)]
    with pytest.raises(StoreUnavailable):
        settle_group(group, uow_factory=unit_of_work, retry=RetryPolicy(max_attempts=3))
    assert len(made) == 1  # neither retried as a conflict nor split into halves
