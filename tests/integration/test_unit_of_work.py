"""The PostgreSQL unit of work: writers of one account queue instead of failing, and no lock outlives a unit."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import psycopg
import pytest

from core.adapters.postgres.db import connect
from core.adapters.postgres.uow import ADVISORY_KEY, PostgresUnitOfWork
from core.application import handlers
from core.application.commands import Credit, Debit
from core.application.views import OperationStatus
from core.bootstrap import LedgerService
from core.domain.ids import external_account_id
from core.domain.money import Money
from core.settings import Settings
from tests.helpers import balance, credit, key, open_account

WAIT_S = 10  # seconds; generous bound on steps that take milliseconds


class PausingUnitOfWork(PostgresUnitOfWork):
    """Holds its transaction open just before COMMIT until the test lets it go."""

    def __init__(self, *args: object, at_commit: threading.Event, release: threading.Event, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.at_commit, self.release = at_commit, release

    def commit(self) -> None:
        self.at_commit.set()
        assert self.release.wait(WAIT_S)
        super().commit()


def advisory_locks(db: psycopg.Connection[tuple[object, ...]], tenant: str, *accounts: UUID) -> int:
    """How many of these accounts' advisory locks any session holds (a bigint key is classid:objid)."""
    held = 0
    for account in accounts:
        found = db.execute(
            f"SELECT {ADVISORY_KEY.format(tenant='%s', account='%s')}", (tenant, str(account))
        ).fetchone()
        assert found is not None
        unsigned = int(str(found[0])) & 0xFFFF_FFFF_FFFF_FFFF
        row = db.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
            " AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
            (unsigned >> 32, unsigned & 0xFFFF_FFFF),
        ).fetchone()
        assert row is not None
        held += int(str(row[0]))
    return held


def backend_waits_on_lock(db: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return row is not None and row[0] != 0


def test_a_writer_of_a_busy_account_waits_its_turn_then_commits_on_its_first_attempt(
    ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    account = open_account(ledger, tenant)
    credit(ledger, tenant, account, 1_000)
    at_commit, release = threading.Event(), threading.Event()
    holder = PausingUnitOfWork(ledger.pool, at_commit=at_commit, release=release)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            handlers.execute, Credit(tenant, account, Money.for_posting(500, "USD")), uow=holder, idempotency_key=key()
        )
        assert at_commit.wait(WAIT_S)  # the first posting holds the account, uncommitted
        # One attempt, no retry policy: before the advisory locks this raised TransientConflict (40001,
        # "could not serialize access due to concurrent update") as soon as the first one committed.
        second = pool.submit(
            handlers.execute,
            Debit(tenant, account, Money.for_posting(1_400, "USD")),
            uow=ledger.unit_of_work(),
            idempotency_key=key(),
        )
        for _ in range(WAIT_S * 100):
            if backend_waits_on_lock(db):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the second posting never waited for the first")
        assert not second.done()
        release.set()
        assert first.result(WAIT_S).status is OperationStatus.SUCCEEDED
        # It saw the credit: 1,000 + 500 covers the debit of 1,400 on an account without overdraft.
        assert second.result(WAIT_S).status is OperationStatus.SUCCEEDED
    assert balance(ledger, tenant, account) == 100


def test_no_advisory_lock_outlives_its_unit_of_work(
    ledger: LedgerService, tenant: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    account = open_account(ledger, tenant)
    external = external_account_id(tenant, "USD")
    assert advisory_locks(db, tenant, account, external) == 0
    k = key()
    command = Credit(tenant, account, Money.for_posting(10, "USD"))
    assert ledger.execute(command, idempotency_key=k).status is OperationStatus.SUCCEEDED  # COMMIT
    assert ledger.execute(command, idempotency_key=k).replayed  # replay: left without COMMIT
    rejected = ledger.execute(Debit(tenant, account, Money.for_posting(99, "USD")), idempotency_key=key())
    assert rejected.status is OperationStatus.FAILED  # a business rejection commits its result
    assert advisory_locks(db, tenant, account, external) == 0

    def fail_half_way() -> None:
        with ledger.unit_of_work().writing([(tenant, account)]) as uow:
            uow.accounts.lock([(tenant, account)])
            assert advisory_locks(db, tenant, account, external) == 1
            raise RuntimeError("the use case failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        fail_half_way()
    assert advisory_locks(db, tenant, account, external) == 0
    # The pool's connections are clean: postings on the account still go through.
    assert credit(ledger, tenant, account, 5).status is OperationStatus.SUCCEEDED
    assert balance(ledger, tenant, account) == 15


def test_a_session_stalled_mid_transaction_is_cut_off_and_its_locks_freed(
    ledger: LedgerService, tenant: str, settings: Settings
) -> None:
    account = open_account(ledger, tenant)
    impatient = settings.replace(db_idle_in_transaction_timeout_ms=300)
    with connect(impatient, autocommit=False) as stalled:
        stalled.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))
        time.sleep(0.6)  # the client stops talking while it holds the row
        # Still connected on our side, yet the server has let go: a posting goes through on its first try.
        posted = handlers.execute(
            Credit(tenant, account, Money.for_posting(7, "USD")), uow=ledger.unit_of_work(), idempotency_key=key()
        )
        assert posted.status is OperationStatus.SUCCEEDED
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            stalled.execute("SELECT 1")
