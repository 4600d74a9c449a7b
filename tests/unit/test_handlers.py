"""Use cases on in-memory fakes: the application's rules, independent of PostgreSQL."""

from __future__ import annotations

from uuid import UUID

import pytest

from core.application import handlers
from core.application.commands import CreateAccount, Credit, Debit, Transfer
from core.application.ports import Claim
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import IdempotencyKeyReused, ProcessingFailed
from core.domain.ids import external_account_id, new_id
from core.domain.money import Money
from tests.unit.fakes import Books, FakeIdempotency, FakeUnitOfWork


@pytest.fixture
def books() -> Books:
    return Books()


def run(books: Books, command: object, key: str) -> OperationResult:
    return handlers.execute(command, uow=FakeUnitOfWork(books), idempotency_key=key)  # type: ignore[arg-type]


def open_account(books: Books, key: str = "acct") -> UUID:
    result = run(books, CreateAccount("acme", "USD"), key)
    assert result.result is not None
    return UUID(result.result["account"]["id"])


def test_credit_creates_the_external_account_on_first_use_and_balances(books: Books) -> None:
    a = open_account(books)
    outcome = run(books, Credit("acme", a, Money.for_posting(500, "USD")), "c1")
    assert outcome.status is OperationStatus.SUCCEEDED
    external = books.accounts[("acme", external_account_id("acme", "USD"))]
    assert (books.accounts[("acme", a)].balance, external.balance) == (500, -500)
    assert [e.type for e in books.events] == ["account.created", "transaction.posted"]


def test_rejection_commits_a_final_result_and_an_event_but_no_posting(books: Books) -> None:
    a, b = open_account(books, "a"), open_account(books, "b")
    outcome = run(books, Transfer("acme", a, b, Money.for_posting(1, "USD")), "t1")
    assert outcome.status is OperationStatus.FAILED
    assert outcome.problem is not None
    assert outcome.problem["code"] == "insufficient-funds"
    assert books.transactions == []
    assert books.events[-1].type == "transaction.rejected"
    assert books.keys[("acme", "t1")][1] == outcome


def test_replay_returns_the_stored_outcome_without_a_second_commit(books: Books) -> None:
    a = open_account(books)
    first = run(books, Credit("acme", a, Money.for_posting(5, "USD")), "k")
    uow = FakeUnitOfWork(books)
    again = handlers.execute(Credit("acme", a, Money.for_posting(5, "USD")), uow=uow, idempotency_key="k")
    assert again.replayed
    assert (again.operation_id, again.result) == (first.operation_id, first.result)
    assert uow.commits == 0
    assert len(books.transactions) == 1


def test_key_reused_for_another_request_changes_nothing(books: Books) -> None:
    a = open_account(books)
    run(books, Credit("acme", a, Money.for_posting(5, "USD")), "k")
    with pytest.raises(IdempotencyKeyReused):
        run(books, Debit("acme", a, Money.for_posting(5, "USD")), "k")
    assert books.accounts[("acme", a)].balance == 5


def record_pending(books: Books, command: Credit, key: str, operation_id: UUID) -> None:
    """As the ingress records a command before queueing it (see test_accept.py)."""
    FakeIdempotency(books).claim([Claim.for_command(command, key, operation_id)])


def test_accepted_operation_is_settled_by_the_worker_under_its_id(books: Books) -> None:
    a = open_account(books)
    command, op = Credit("acme", a, Money.for_posting(9, "USD")), new_id()
    record_pending(books, command, "q", op)
    settled = handlers.execute(command, uow=FakeUnitOfWork(books), idempotency_key="q", operation_id=new_id())
    assert (settled.operation_id, settled.status) == (op, OperationStatus.SUCCEEDED)
    assert books.transactions[0][1] == op


def test_give_up_settles_pending_as_processing_failed_but_never_overrides_a_result(books: Books) -> None:
    a = open_account(books)
    command, op = Credit("acme", a, Money.for_posting(9, "USD")), new_id()
    record_pending(books, command, "q", op)
    failed = handlers.give_up(
        command, uow=FakeUnitOfWork(books), idempotency_key="q", operation_id=op, error=ProcessingFailed("tired")
    )
    assert failed.problem is not None
    assert failed.problem["code"] == "processing-failed"
    done = run(books, command, "other")
    kept = handlers.give_up(
        command,
        uow=FakeUnitOfWork(books),
        idempotency_key="other",
        operation_id=done.operation_id,
        error=ProcessingFailed(),
    )
    assert kept.status is OperationStatus.SUCCEEDED
    assert books.accounts[("acme", a)].balance == 9
