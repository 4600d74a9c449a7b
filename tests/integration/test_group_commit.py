"""Group commit on the real PostgreSQL and through a real worker: many commands, one commit, and no command
can spoil the others."""

from __future__ import annotations

from uuid import UUID

import psycopg

from core.adapters.postgres.verify import verify
from core.adapters.rabbitmq.commands import CommandPublisher
from core.application.commands import CreateAccount, Credit, Debit, Transfer
from core.application.group_commit import Unsettled
from core.application.ports import Submission
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService
from core.domain.errors import IdempotencyKeyReused
from core.domain.ids import new_id
from core.domain.model import OverdraftPolicy
from core.domain.money import Money
from core.settings import Settings
from tests.helpers import balance, credit, key, open_account, record_pending
from tests.integration.test_worker_failures import dead_letters, wait_for_lock_waiter, wait_until_settled
from tests.processes import ManagedProcess, settings_env, worker_command
from tests.services import delete_queues, private_queues


def usd(amount: int) -> Money:
    return Money.for_posting(amount, "USD")


def submit(command: object, idempotency_key: str | None = None) -> Submission:
    return Submission(command, idempotency_key or key(), new_id())  # type: ignore[arg-type]


def results(outcomes: list[object]) -> list[OperationResult]:
    assert all(isinstance(o, OperationResult) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def postings_of(db: psycopg.Connection[tuple[object, ...]], tenant: str) -> list[tuple[object, ...]]:
    """(operation id, created_at) of the tenant's transactions."""
    return db.execute(
        "SELECT operation_id, created_at FROM transactions WHERE tenant_id = %s ORDER BY created_at", (tenant,)
    ).fetchall()


def test_a_group_mixing_rejections_and_successes_on_one_account_commits_once_in_order(
    ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 100)
    group = [
        submit(Debit(tenant, a, usd(60))),  # 100 -> 40
        submit(Debit(tenant, a, usd(60))),  # refused: 40 left
        submit(Credit(tenant, a, usd(50))),  # 40 -> 90: sees the refusal changed nothing
        submit(Transfer(tenant, a, b, usd(60))),  # 90 -> 30
        submit(Transfer(tenant, b, a, usd(61))),  # refused: b holds 60
        submit(CreateAccount(tenant, "USD", OverdraftPolicy(0))),
    ]
    before = len(postings_of(db, tenant))
    outcomes = results(ledger.settle_group(group))
    assert [o.status for o in outcomes] == [
        OperationStatus.SUCCEEDED,
        OperationStatus.FAILED,
        OperationStatus.SUCCEEDED,
        OperationStatus.SUCCEEDED,
        OperationStatus.FAILED,
        OperationStatus.SUCCEEDED,
    ]
    assert [o.problem["code"] for o in outcomes if o.problem] == ["insufficient-funds", "insufficient-funds"]
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (30, 60)
    # Each result shows the balance its own posting left, not the group's final one.
    assert outcomes[0].result is not None and outcomes[3].result is not None
    assert outcomes[0].result["accounts"][0]["balance"]["posted"] == 40
    assert {x["id"]: x["balance"]["posted"] for x in outcomes[3].result["accounts"]} == {str(a): 30, str(b): 60}
    new = postings_of(db, tenant)[before:]
    assert len(new) == 3
    assert len({created_at for _, created_at in new}) == 1, "one group, one transaction, one clock"
    # The stored outcome of every member is its own, replayed for its key.
    for submission, outcome in zip(group, outcomes, strict=True):
        again = ledger.execute(submission.command, idempotency_key=submission.idempotency_key)
        assert (again.replayed, again.operation_id, again.status) == (True, outcome.operation_id, outcome.status)
    assert verify(db) == []


def test_a_group_serving_two_tenants_writes_each_tenants_postings_under_its_own_name(
    ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    """Postings travel to PostgreSQL grouped by tenant: each entry keeps its own tenant and the group's time."""
    other = f"{tenant}-b"
    a, b = open_account(ledger, tenant), open_account(ledger, other)
    outcomes = results(
        ledger.settle_group(
            [submit(Credit(tenant, a, usd(5))), submit(Credit(other, b, usd(7))), submit(Credit(tenant, a, usd(1)))]
        )
    )
    assert [o.status for o in outcomes] == [OperationStatus.SUCCEEDED] * 3
    rows = db.execute(
        "SELECT e.tenant_id, e.account_id, e.amount, e.created_at = t.created_at FROM entries e"
        " JOIN transactions t ON t.id = e.transaction_id WHERE t.operation_id = ANY(%s) AND e.amount > 0"
        " ORDER BY e.tenant_id, e.amount",
        ([o.operation_id for o in outcomes],),
    ).fetchall()
    assert rows == [(tenant, a, 1, True), (tenant, a, 5, True), (other, b, 7, True)]
    assert (balance(ledger, tenant, a), balance(ledger, other, b)) == (6, 7)
    assert verify(db) == []


def test_one_key_twice_in_a_group_posts_once_and_answers_both_alike(
    ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    a = open_account(ledger, tenant)
    command = Credit(tenant, a, usd(25))
    twice = key()
    outcomes = ledger.settle_group(
        [
            submit(command, twice),
            submit(Credit(tenant, a, usd(1))),
            submit(command, twice),
            submit(Debit(tenant, a, usd(25)), twice),  # the same key for another request
        ]
    )
    first, other, second, reused = outcomes
    assert isinstance(first, OperationResult) and isinstance(second, OperationResult)
    assert first.status is OperationStatus.SUCCEEDED and not first.replayed
    assert (second.operation_id, second.result, second.replayed) == (first.operation_id, first.result, True)
    assert isinstance(reused, IdempotencyKeyReused)
    assert isinstance(other, OperationResult) and other.status is OperationStatus.SUCCEEDED
    assert balance(ledger, tenant, a) == 26
    count = db.execute("SELECT count(*) FROM transactions WHERE operation_id = %s", (first.operation_id,)).fetchone()
    assert count == (1,)


def test_a_poison_command_fails_alone_and_the_rest_of_its_group_commits(
    ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]], poison: dict[str, object]
) -> None:
    a = open_account(ledger, tenant)
    bad = submit(Credit(tenant, a, usd(1_000), metadata=poison))
    good = [submit(Credit(tenant, a, usd(n))) for n in range(1, 8)]
    outcomes = ledger.settle_group([*good[:3], bad, *good[3:]])
    assert isinstance(outcomes[3], Unsettled)
    assert isinstance(outcomes[3].error, psycopg.errors.RaiseException)
    rest = results([*outcomes[:3], *outcomes[4:]])
    assert all(o.status is OperationStatus.SUCCEEDED for o in rest)
    assert balance(ledger, tenant, a) == sum(range(1, 8))
    assert ledger.queries.operation(tenant, bad.operation_id) is None  # nothing of it was committed
    assert verify(db) == []


def publish(settings: Settings, items: list[tuple[UUID, str, object]]) -> None:
    publisher = CommandPublisher(settings.amqp_url, queue_name=settings.command_queue)
    try:
        for operation_id, idempotency_key, command in items:
            publisher.publish(operation_id=operation_id, idempotency_key=idempotency_key, command=command)  # type: ignore[arg-type]
    finally:
        publisher.close()


def test_a_worker_gives_up_on_a_poison_message_alone_and_settles_its_group(
    settings: Settings, ledger: LedgerService, tenant: str, poison: dict[str, object]
) -> None:
    impatient = private_queues(
        settings,
        "poison",
        worker_max_retries=2,
        worker_min_backoff_ms=50,
        worker_max_backoff_ms=100,
    )
    a = open_account(ledger, tenant)
    bad = (new_id(), key(), Credit(tenant, a, usd(1_000), metadata=poison))
    good = [(new_id(), key(), Credit(tenant, a, usd(n))) for n in range(1, 11)]
    for operation_id, k, command in [*good, bad]:
        record_pending(ledger, command, k, operation_id)  # type: ignore[arg-type]
    try:
        publish(impatient, [*good[:5], bad, *good[5:]])  # queued before the worker starts: one group
        with ManagedProcess.start(worker_command(), env=settings_env(impatient), name="poison-worker") as worker:
            failed = wait_until_settled(ledger, tenant, bad[0], 30)
            settled = [wait_until_settled(ledger, tenant, op, 10) for op, _, _ in good]
            assert failed.status is OperationStatus.FAILED, worker.output()
        assert failed.problem is not None and failed.problem["code"] == "processing-failed"
        assert failed.problem["retries"] == 2
        assert all(o.status is OperationStatus.SUCCEEDED for o in settled)
        assert balance(ledger, tenant, a) == sum(range(1, 11))
        assert dead_letters(impatient) == 1
    finally:
        delete_queues(impatient)


def test_a_worker_killed_mid_group_leaves_every_command_to_settle_exactly_once(
    settings: Settings, ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    queue = private_queues(settings, "kill9group")
    env = settings_env(queue)
    accounts = [open_account(ledger, tenant) for _ in range(5)]
    items = [(new_id(), key(), Credit(tenant, accounts[n % 5], usd(100 + n))) for n in range(40)]
    for operation_id, k, command in items:
        record_pending(ledger, command, k, operation_id)  # type: ignore[arg-type]
    try:
        with psycopg.connect(settings.database_url) as blocker:
            # Hold one account's row: the worker's group transaction begins, then waits inside it.
            blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (accounts[0],))
            publish(queue, items)
            with ManagedProcess.start(worker_command(), env=env, name="doomed-group-worker") as doomed:
                wait_for_lock_waiter(settings, blocker.info.backend_pid)
                doomed.kill()  # SIGKILL mid-group: no rollback, no nack, nothing graceful
        assert postings_of(db, tenant) == [], "nothing of the group was committed before the kill"
        with ManagedProcess.start(worker_command(), env=env, name="successor-group-worker"):
            settled = [wait_until_settled(ledger, tenant, op, 30) for op, _, _ in items]
        assert all(o.status is OperationStatus.SUCCEEDED for o in settled)
        for n, account in enumerate(accounts):
            assert balance(ledger, tenant, account) == sum(100 + i for i in range(n, 40, 5))
        per_operation = db.execute(
            "SELECT operation_id, count(*) FROM transactions WHERE tenant_id = %s GROUP BY operation_id", (tenant,)
        ).fetchall()
        assert sorted(op for op, _ in per_operation) == sorted(op for op, _, _ in items)
        assert all(n == 1 for _, n in per_operation)
        assert verify(db) == []
    finally:
        delete_queues(queue)
