"""Workers when things go wrong: lost publishes are redelivered, endless conflicts end as processing-failed."""

from __future__ import annotations

import time

import pika
import psycopg

from core.adapters.rabbitmq.commands import CommandPublisher
from core.application.commands import Credit
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService
from core.domain.ids import new_id
from core.domain.money import Money
from core.settings import Settings
from tests.helpers import balance, open_account, record_pending
from tests.processes import ManagedProcess, settings_env, worker_command
from tests.services import delete_queues, private_queues
from workers.redeliver import RedeliverySweeper


def wait_until_settled(ledger: LedgerService, tenant: str, operation_id: object, timeout_s: float) -> OperationResult:
    deadline = time.monotonic() + timeout_s
    while True:
        op = ledger.queries.operation(tenant, operation_id)  # type: ignore[arg-type]
        assert op is not None
        if op.settled or time.monotonic() > deadline:
            return op
        time.sleep(0.05)


def test_an_accepted_command_that_never_reached_the_queue_is_redelivered(
    settings: Settings, worker: ManagedProcess, ledger: LedgerService, tenant: str
) -> None:
    account = open_account(ledger, tenant)
    operation_id = new_id()
    command = Credit(tenant, account, Money.for_posting(1_234, "USD"))
    # The ingress recorded the operation, then died before publishing: nothing is on the queue.
    record_pending(ledger, command, "lost-publish", operation_id)
    time.sleep(0.3)
    assert wait_until_settled(ledger, tenant, operation_id, 0).status is OperationStatus.PENDING

    publisher = CommandPublisher(settings.amqp_url, queue_name=settings.command_queue)
    try:
        sweeper = RedeliverySweeper(ledger.pool, publisher, redeliver_after_s=0)
        assert sweeper.run_once() >= 1
    finally:
        publisher.close()
    assert wait_until_settled(ledger, tenant, operation_id, 15).status is OperationStatus.SUCCEEDED
    assert balance(ledger, tenant, account) == 1_234


def test_one_stored_request_that_no_longer_rebuilds_does_not_stop_the_sweep(
    settings: Settings, worker: ManagedProcess, ledger: LedgerService, tenant: str
) -> None:
    account = open_account(ledger, tenant)
    broken, fine = new_id(), new_id()
    command = Credit(tenant, account, Money.for_posting(77, "USD"))
    record_pending(ledger, command, "unreadable", broken)
    record_pending(ledger, command, "readable", fine)
    with psycopg.connect(settings.database_url, autocommit=True) as db:
        # As a lossy JSONB round trip can leave it: the stored copy no longer makes a valid command.
        db.execute(
            "UPDATE operations SET request = (request::jsonb || '{\"amount\": -1}')::json WHERE id = %s", (broken,)
        )
        db.execute("UPDATE operations SET created_at = created_at - interval '1 hour' WHERE id = %s", (broken,))
    publisher = CommandPublisher(settings.amqp_url, queue_name=settings.command_queue)
    try:
        sweeper = RedeliverySweeper(ledger.pool, publisher, redeliver_after_s=0)
        assert sweeper.run_once() >= 1  # the others are published: the sweep neither raised nor rolled back
    finally:
        publisher.close()
    assert wait_until_settled(ledger, tenant, fine, 15).status is OperationStatus.SUCCEEDED
    assert wait_until_settled(ledger, tenant, broken, 0).status is OperationStatus.PENDING


def test_retries_exhausted_settle_as_processing_failed_and_dead_letter(
    settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    impatient = private_queues(
        settings,
        "exhaust",
        worker_max_retries=1,
        worker_min_backoff_ms=50,
        worker_max_backoff_ms=100,
        db_lock_timeout_ms=50,  # a held row lock turns into a transient conflict quickly
    )
    account = open_account(ledger, tenant)
    operation_id = new_id()
    command = Credit(tenant, account, Money.for_posting(10, "USD"))
    record_pending(ledger, command, "never-gets-the-lock", operation_id)
    try:
        with (
            psycopg.connect(settings.database_url) as blocker,
            ManagedProcess.start(worker_command(), env=settings_env(impatient), name="impatient-worker"),
        ):
            blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))  # held until exit
            publisher = CommandPublisher(impatient.amqp_url, queue_name=impatient.command_queue)
            try:
                publisher.publish(operation_id=operation_id, idempotency_key="never-gets-the-lock", command=command)
            finally:
                publisher.close()
            settled = wait_until_settled(ledger, tenant, operation_id, 60)
        assert settled.status is OperationStatus.FAILED
        assert settled.problem is not None
        assert settled.problem["code"] == "processing-failed"
        assert dead_letters(impatient) >= 1
        assert balance(ledger, tenant, account) == 0
        # The failure is final: the same key replays it rather than posting now that the lock is free.
        again = ledger.execute(command, idempotency_key="never-gets-the-lock")
        assert again.replayed
        assert again.status is OperationStatus.FAILED
    finally:
        delete_queues(impatient)


def dead_letters(settings: Settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        declared = connection.channel().queue_declare(f"{settings.command_queue}.XQ", passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


def test_a_worker_killed_mid_posting_leaves_the_command_to_settle_exactly_once(
    settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    queue = private_queues(settings, "kill9")
    env = settings_env(queue)
    account = open_account(ledger, tenant)
    operation_id = new_id()
    command = Credit(tenant, account, Money.for_posting(4_321, "USD"))
    record_pending(ledger, command, "kill-9", operation_id)
    try:
        with psycopg.connect(settings.database_url) as blocker:
            # Hold the account's row lock: the worker's posting transaction starts, then waits inside it.
            blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))
            with ManagedProcess.start(worker_command(), env=env, name="doomed-worker") as doomed:
                publisher = CommandPublisher(queue.amqp_url, queue_name=queue.command_queue)
                try:
                    publisher.publish(operation_id=operation_id, idempotency_key="kill-9", command=command)
                finally:
                    publisher.close()
                wait_for_lock_waiter(settings, blocker.info.backend_pid)
                doomed.kill()  # SIGKILL mid-posting: no rollback, no nack, nothing graceful
        # Lock released, the doomed worker gone: a fresh worker gets the redelivered message.
        with ManagedProcess.start(worker_command(), env=env, name="successor-worker"):
            settled = wait_until_settled(ledger, tenant, operation_id, 30)
        assert settled.status is OperationStatus.SUCCEEDED
        assert balance(ledger, tenant, account) == 4_321
        with psycopg.connect(settings.database_url) as conn:
            count = conn.execute(
                "SELECT count(*) FROM transactions WHERE operation_id = %s", (operation_id,)
            ).fetchone()
        assert count == (1,)
    finally:
        delete_queues(queue)


def wait_for_lock_waiter(settings: Settings, holder_pid: int, timeout_s: float = 20) -> None:
    """Until some session is blocked on a lock that `holder_pid` holds (the worker, mid-posting)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.database_url, autocommit=True) as monitor:
        while time.monotonic() < deadline:
            row = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (holder_pid,)
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the worker never reached the posting")
