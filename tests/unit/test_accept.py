"""The accept phase on in-memory fakes: grouping, the in-flight answer, and what a refused publish undoes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from core.application.accept import PUBLISH_GRACE_S, Acceptance
from core.application.commands import CreateAccount, Credit
from core.application.ports import StoreUnavailable
from core.application.views import OperationStatus
from core.domain.errors import IdempotencyKeyInUse, IdempotencyKeyReused, ServiceUnavailable
from core.domain.money import Money
from tests.unit.fakes import Books, FakeCommandQueue, FakeOperationRecords, FakeQueuedKeys


class Fixture:
    def __init__(self) -> None:
        self.books = Books()
        self.records = FakeOperationRecords(self.books)
        self.queue = FakeCommandQueue()
        self.queued_keys = FakeQueuedKeys()
        self.acceptance = Acceptance(
            records=self.records, queue=self.queue, queued_keys=self.queued_keys, max_group=64, retry_after_s=7
        )


@pytest.fixture
async def f() -> AsyncIterator[Fixture]:
    fixture = Fixture()
    yield fixture
    await fixture.acceptance.close()


def credit(amount: int = 10) -> Credit:
    return Credit("acme", uuid4(), Money.for_posting(amount, "USD"))


async def test_a_new_command_is_recorded_then_queued_then_pending(f: Fixture) -> None:
    accepted = await f.acceptance.accept(credit(), idempotency_key="k1")
    assert (accepted.status, accepted.replayed) == (OperationStatus.PENDING, False)
    assert f.queue.published == [(accepted.operation_id, "k1")]
    assert f.books.keys[("acme", "k1")][1].operation_id == accepted.operation_id
    assert f.queued_keys.keys[("acme", "k1")] == accepted.operation_id


async def test_concurrent_requests_share_record_statements_and_messages(f: Fixture) -> None:
    answers = await asyncio.gather(*(f.acceptance.accept(credit(n + 1), idempotency_key=f"k{n}") for n in range(200)))
    assert len({a.operation_id for a in answers}) == 200
    assert sum(f.records.groups) == 200
    assert len(f.records.groups) < 20, f.records.groups  # grouped, not one statement per request
    assert max(f.records.groups) <= 64  # max_group
    assert [len(m) for m in f.queue.messages] == f.records.groups  # one message per group
    assert sorted(op for op, _ in f.queue.published) == sorted(a.operation_id for a in answers)


async def test_a_duplicate_after_the_confirm_gets_the_same_operation(f: Fixture) -> None:
    command = credit()
    first = await f.acceptance.accept(command, idempotency_key="k")
    again = await f.acceptance.accept(command, idempotency_key="k")
    assert (again.operation_id, again.replayed) == (first.operation_id, True)
    assert len(f.queue.published) == 1


async def test_a_duplicate_in_the_same_group_gets_the_operation_once_queued(f: Fixture) -> None:
    command = credit()
    first, second = await asyncio.gather(
        f.acceptance.accept(command, idempotency_key="k"), f.acceptance.accept(command, idempotency_key="k")
    )
    assert (first.replayed, second.replayed, second.operation_id) == (False, True, first.operation_id)
    assert len(f.queue.published) == 1


async def test_a_duplicate_in_a_group_whose_publish_failed_gets_the_in_flight_answer(f: Fixture) -> None:
    f.records.down_for_withdrawals = True  # the record cannot be withdrawn: it stays pending, unqueued
    f.queue.down = True
    command = credit()
    first, second = await asyncio.gather(
        f.acceptance.accept(command, idempotency_key="k"),
        f.acceptance.accept(command, idempotency_key="k"),
        return_exceptions=True,
    )
    assert not isinstance(first, BaseException) and first.status is OperationStatus.PENDING  # the sweeper's now
    assert isinstance(second, IdempotencyKeyInUse) and second.extensions["retry_after"] == 1


async def test_an_unconfirmed_pending_key_is_in_flight_until_its_grace_period_ends(f: Fixture) -> None:
    command = credit()
    await f.acceptance.accept(command, idempotency_key="k")
    f.queued_keys.keys.clear()  # the cache lost its word (Redis restarted)
    with pytest.raises(IdempotencyKeyInUse):
        await f.acceptance.accept(command, idempotency_key="k")
    f.records.age_s = PUBLISH_GRACE_S + 1  # its first request's publisher is surely gone now
    again = await f.acceptance.accept(command, idempotency_key="k")
    assert again.replayed and again.status is OperationStatus.PENDING


async def test_a_key_reused_for_another_request_is_refused(f: Fixture) -> None:
    first = await f.acceptance.accept(credit(10), idempotency_key="k")
    with pytest.raises(IdempotencyKeyReused) as refused:
        await f.acceptance.accept(credit(11), idempotency_key="k")
    assert refused.value.extensions["operation_id"] == str(first.operation_id)


async def test_an_unconfirmed_publish_withdraws_the_record_and_answers_503(f: Fixture) -> None:
    f.queue.down = True
    with pytest.raises(ServiceUnavailable) as refused:
        await f.acceptance.accept(credit(), idempotency_key="k")
    assert refused.value.extensions["retry_after"] == 7
    assert ("acme", "k") not in f.books.keys  # nothing accepted
    f.queue.down = False
    accepted = await f.acceptance.accept(credit(), idempotency_key="k")  # the retry starts afresh
    assert (accepted.replayed, f.queue.published) == (False, [(accepted.operation_id, "k")])


async def test_a_record_that_cannot_be_withdrawn_is_answered_pending_not_503(f: Fixture) -> None:
    f.queue.down = True
    f.records.down_for_withdrawals = True  # PostgreSQL went too, after the record
    accepted = await f.acceptance.accept(credit(), idempotency_key="k")
    assert accepted.status is OperationStatus.PENDING  # the sweeper will queue it: it settles
    assert f.books.keys[("acme", "k")][1].operation_id == accepted.operation_id


async def test_a_claim_the_store_refuses_fails_alone(f: Fixture) -> None:
    f.records.refused.add("bad")
    answers = await asyncio.gather(
        *(f.acceptance.accept(credit(), idempotency_key=k) for k in ("a", "bad", "b", "c")), return_exceptions=True
    )
    assert [isinstance(a, ValueError) for a in answers] == [False, True, False, False]
    assert sorted(k for _, k in f.queue.published) == ["a", "b", "c"]


async def test_the_store_down_fails_every_request_of_the_group_with_503(f: Fixture) -> None:
    f.records.down = True
    answers = await asyncio.gather(
        *(f.acceptance.accept(CreateAccount("acme", "USD"), idempotency_key=f"k{n}") for n in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(a, StoreUnavailable) and a.status == 503 for a in answers)
    assert f.queue.published == []
