"""The ledger's use cases against the real PostgreSQL: postings, rules, idempotency, reads, verify."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from core.adapters.postgres.migrate import migrate
from core.adapters.postgres.queries import ledger_id
from core.adapters.postgres.verify import verify
from core.application.commands import ChangeAccountStatus, CreateAccount, Credit, Debit, Transfer
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService, bootstrap
from core.cli import main as cli_main
from core.domain.errors import IdempotencyKeyReused, RequestInvalid, ValidationFailed
from core.domain.ids import external_account_id, new_id
from core.domain.model import AccountStatus, OverdraftPolicy
from core.domain.money import Money
from core.settings import Settings
from tests.helpers import balance, credit, debit, key, open_account, transfer


def test_credit_debit_transfer_post_balanced_entries(ledger: LedgerService, tenant: str) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    assert credit(ledger, tenant, a, 10_000).status is OperationStatus.SUCCEEDED
    assert debit(ledger, tenant, a, 2_500).status is OperationStatus.SUCCEEDED
    posted = transfer(ledger, tenant, a, b, 4_000)
    assert posted.status is OperationStatus.SUCCEEDED
    assert posted.result is not None
    entries = posted.result["transaction"]["entries"]
    assert sorted(e["amount"] for e in entries) == [-4_000, 4_000]
    assert {e["account_id"]: e["balance_after"] for e in entries} == {str(a): 3_500, str(b): 4_000}
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (3_500, 4_000)
    # Credits and debits post against the tenant's USD external account: it holds the mirror image.
    assert balance(ledger, tenant, external_account_id(tenant, "USD")) == -7_500


def test_insufficient_funds_is_a_stored_final_rejection(ledger: LedgerService, tenant: str) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 100)
    k = key()
    cmd = Transfer(tenant, a, b, Money.for_posting(101, "USD"))
    first = ledger.execute(cmd, idempotency_key=k)
    assert first.status is OperationStatus.FAILED
    assert first.problem is not None and first.problem["code"] == "insufficient-funds"
    credit(ledger, tenant, a, 1_000)  # funds arrive later: the same key still answers the same rejection
    again = ledger.execute(cmd, idempotency_key=k)
    assert (again.status, again.operation_id, again.replayed) == (OperationStatus.FAILED, first.operation_id, True)
    assert balance(ledger, tenant, b) == 0


def test_overdraft_limit_is_enforced(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant, overdraft=300)
    assert debit(ledger, tenant, a, 300).status is OperationStatus.SUCCEEDED
    rejected = debit(ledger, tenant, a, 1)
    assert rejected.problem is not None and rejected.problem["code"] == "insufficient-funds"
    assert balance(ledger, tenant, a) == -300


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda t, a, b, c: Transfer(t, a, c, Money.for_posting(1, "USD")), "currency-mismatch"),
        (lambda t, a, b, c: Credit(t, a, Money.for_posting(1, "EUR")), "currency-mismatch"),
        (lambda t, a, b, c: Transfer(t, a, uuid.uuid4(), Money.for_posting(1, "USD")), "account-not-found"),
        (lambda t, a, b, c: Debit(t, uuid.uuid4(), Money.for_posting(1, "USD")), "account-not-found"),
        (
            lambda t, a, b, c: Transfer(t, a, external_account_id(t, "USD"), Money.for_posting(1, "USD")),
            "account-not-found",
        ),
    ],
)
def test_business_rules_reject_with_stable_codes(ledger: LedgerService, tenant: str, make: object, code: str) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    c = open_account(ledger, tenant, "EUR")
    credit(ledger, tenant, a, 1_000)
    result = ledger.execute(make(tenant, a, b, c), idempotency_key=key())  # type: ignore[operator]
    assert result.status is OperationStatus.FAILED
    assert result.problem is not None and result.problem["code"] == code


def test_tenants_cannot_touch_each_others_accounts(ledger: LedgerService, tenant: str) -> None:
    mine = open_account(ledger, tenant)
    theirs_tenant = f"{tenant}-other"
    theirs = open_account(ledger, theirs_tenant)
    credit(ledger, theirs_tenant, theirs, 500)
    stolen = transfer(ledger, tenant, theirs, mine, 100)
    assert stolen.problem is not None and stolen.problem["code"] == "account-not-found"
    assert ledger.queries.account(tenant, theirs) is None
    assert balance(ledger, theirs_tenant, theirs) == 500


def test_frozen_account_refuses_postings_until_unfrozen(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    frozen = ledger.execute(ChangeAccountStatus(tenant, a, AccountStatus.FROZEN), idempotency_key=key())
    assert frozen.status is OperationStatus.SUCCEEDED
    refused = credit(ledger, tenant, a, 1)
    assert refused.problem is not None and refused.problem["code"] == "account-frozen"
    ledger.execute(ChangeAccountStatus(tenant, a, AccountStatus.OPEN), idempotency_key=key())
    assert credit(ledger, tenant, a, 1).status is OperationStatus.SUCCEEDED


def test_same_key_same_request_replays_without_a_second_posting(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    k, cmd = key(), Credit(tenant, a, Money.for_posting(700, "USD"))
    first = ledger.execute(cmd, idempotency_key=k)
    second = ledger.execute(cmd, idempotency_key=k)
    assert second.replayed and not first.replayed
    assert (second.operation_id, second.result) == (first.operation_id, first.result)
    assert balance(ledger, tenant, a) == 700


def test_same_key_different_request_is_refused(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    k = key()
    ledger.execute(Credit(tenant, a, Money.for_posting(700, "USD")), idempotency_key=k)
    with pytest.raises(IdempotencyKeyReused):
        ledger.execute(Credit(tenant, a, Money.for_posting(701, "USD")), idempotency_key=k)
    assert balance(ledger, tenant, a) == 700


def test_same_key_fired_concurrently_posts_once(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    for _ in range(5):
        k, cmd = key(), Credit(tenant, a, Money.for_posting(10, "USD"))
        barrier = threading.Barrier(8)
        results: list[OperationResult] = []

        def fire(
            barrier: threading.Barrier = barrier,
            cmd: Credit = cmd,
            k: str = k,
            results: list[OperationResult] = results,
        ) -> None:
            barrier.wait()
            results.append(ledger.execute(cmd, idempotency_key=k))

        threads = [threading.Thread(target=fire) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({r.operation_id for r in results}) == 1
        assert sum(not r.replayed for r in results) == 1
    assert balance(ledger, tenant, a) == 50


def test_client_chosen_account_id_is_unique(ledger: LedgerService, tenant: str) -> None:
    chosen = uuid.uuid4()
    created = ledger.execute(CreateAccount(tenant, "USD", account_id=chosen), idempotency_key=key())
    assert created.result is not None and created.result["account"]["id"] == str(chosen)
    dup = ledger.execute(CreateAccount(tenant, "USD", account_id=chosen), idempotency_key=key())
    assert dup.problem is not None and dup.problem["code"] == "account-exists"


def test_entries_page_newest_first_with_cursor_and_time_range(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    for amount in range(1, 26):
        credit(ledger, tenant, a, amount)
    seen, cursor = [], None
    while True:
        page = ledger.queries.entries(tenant, a, limit=7, cursor=cursor)
        seen.extend(e.amount for e in page.entries)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(range(25, 0, -1))
    oldest = ledger.queries.entries(tenant, a, limit=3, newest_first=False)
    assert [e.amount for e in oldest.entries] == [1, 2, 3]
    assert [e.balance_after for e in oldest.entries] == [1, 3, 6]
    everything = ledger.queries.entries(tenant, a, limit=1000).entries
    cut = everything[10].created_at  # entries 15 and older
    older = ledger.queries.entries(tenant, a, limit=1000, until=cut).entries
    newer = ledger.queries.entries(tenant, a, limit=1000, since=cut).entries
    assert len(older) + len(newer) == 25 and all(e.created_at < cut for e in older)
    empty = ledger.queries.entries(tenant, a, limit=10, since=cut + timedelta(days=1))
    assert empty.entries == [] and empty.next_cursor is None


def test_entries_reject_bad_limits_and_cursors(ledger: LedgerService, tenant: str) -> None:
    a = open_account(ledger, tenant)
    with pytest.raises(RequestInvalid):
        ledger.queries.entries(tenant, a, limit=1001)
    with pytest.raises(RequestInvalid):
        ledger.queries.entries(tenant, a, limit=10, cursor="garbage!")


def test_entries_use_the_index_not_a_scan(ledger: LedgerService, tenant: str, db: psycopg.Connection) -> None:
    a = open_account(ledger, tenant)
    # On a table this small any plan is cheap: what is asked is that an index gives these rows in this order
    # (a fresh cluster's planner would otherwise as soon sort a bitmap scan of the account's foreign-key index).
    db.execute("SET enable_seqscan = off")
    db.execute("SET enable_bitmapscan = off")
    db.execute("SET enable_sort = off")
    plan = "\n".join(
        r[0]
        for r in db.execute(
            "EXPLAIN SELECT * FROM entries WHERE tenant_id = %s AND account_id = %s"
            " AND (created_at, sequence) < (now(), 10) ORDER BY created_at DESC, sequence DESC LIMIT 50",
            (tenant, a),
        ).fetchall()
    )
    assert "entries_account_time_idx" in plan


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE entries SET amount = amount + 1",
        "DELETE FROM entries",
        "UPDATE transactions SET kind = 'credit'",
        "DELETE FROM transactions",
        "TRUNCATE entries CASCADE",
        "DELETE FROM accounts",
    ],
)
def test_ledger_history_is_append_only(
    ledger: LedgerService, tenant: str, db: psycopg.Connection, statement: str
) -> None:
    a = open_account(ledger, tenant)
    credit(ledger, tenant, a, 5)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        db.execute(statement)


@pytest.mark.parametrize(
    ("tenant_id", "currency"), [("Upper-Case", "USD"), ("-leading", "USD"), ("ok", "usd"), ("ok", "US1")]
)
def test_the_store_refuses_an_account_whose_tenant_or_currency_is_malformed(
    db: psycopg.Connection, tenant_id: str, currency: str
) -> None:
    """The last line behind the domain's own checks, on insert and on an update that sets either column; a
    balance update is let through. Nothing is committed: accounts are never deleted."""
    insert = "INSERT INTO accounts (id, tenant_id, currency, kind, overdraft_limit) VALUES (%s, %s, %s, 'customer', 0)"
    with pytest.raises(psycopg.errors.CheckViolation), db.transaction(force_rollback=True):
        db.execute(insert, (uuid.uuid4(), tenant_id, currency))
    account = uuid.uuid4()
    with db.transaction(force_rollback=True):
        db.execute(insert, (account, "ok", "USD"))
        updated = db.execute("UPDATE accounts SET posted_balance = 7 WHERE tenant_id = 'ok' AND id = %s", (account,))
        assert updated.rowcount == 1
        renamed = "UPDATE accounts SET tenant_id = %s, currency = %s WHERE tenant_id = 'ok' AND id = %s"
        with pytest.raises(psycopg.errors.CheckViolation):
            db.execute(renamed, (tenant_id, currency, account))


def test_migrations_run_twice_are_a_no_op(settings: Settings, db: psycopg.Connection) -> None:
    before = db.execute("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version").fetchall()
    assert migrate(settings) == []
    after = db.execute("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version").fetchall()
    assert before == after and len(before) >= 1


def test_each_database_has_its_own_ledger_id_kept_across_migrations(settings: Settings, ledger: LedgerService) -> None:
    first = ledger_id(ledger.pool)
    assert uuid.UUID(first)
    assert migrate(settings) == []
    assert ledger_id(ledger.pool) == first
    with psycopg.connect(settings.database_url, autocommit=True) as admin:
        other = f"{admin.info.dbname}_other"
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    other_settings = settings.replace(database_url=psycopg.conninfo.make_conninfo(settings.database_url, dbname=other))
    try:
        migrate(other_settings)
        with psycopg.connect(other_settings.database_url) as conn:
            row = conn.execute("SELECT id FROM ledger_instance").fetchone()
        assert row is not None and str(row[0]) != first
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(other)))


def test_verify_passes_then_catches_a_tampered_balance(
    ledger: LedgerService, tenant: str, settings: Settings, db: psycopg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    a = open_account(ledger, tenant)
    credit(ledger, tenant, a, 900)
    assert verify(psycopg.connect(settings.database_url)) == []
    assert cli_main(["--database-url", settings.database_url, "verify"]) == 0
    db.execute("UPDATE accounts SET posted_balance = posted_balance + 1 WHERE id = %s", (a,))
    try:
        violations = verify(psycopg.connect(settings.database_url))
        assert any(str(a) in str(v) for v in violations)
        assert cli_main(["--database-url", settings.database_url, "verify"]) == 1
        assert "VIOLATION" in capsys.readouterr().out
    finally:
        db.execute("UPDATE accounts SET posted_balance = posted_balance - 1 WHERE id = %s", (a,))
    assert verify(psycopg.connect(settings.database_url)) == []


def test_create_account_defaults_to_no_overdraft(ledger: LedgerService, tenant: str) -> None:
    result = ledger.execute(CreateAccount(tenant, "BHD", OverdraftPolicy()), idempotency_key=key())
    assert result.result is not None
    body = result.result["account"]
    assert body["debits_must_not_exceed_credits"] is True and body["currency"] == "BHD"
    assert body["balance"] == {"posted": 0, "pending_debits": 0, "pending_credits": 0, "available": 0}


@contextlib.contextmanager
def scratch_ledger(settings: Settings, suffix: str) -> Iterator[tuple[Settings, UUID]]:
    """A throwaway database (what a test writes there can never be removed: the books are append-only) holding
    one funded account of tenant "scratch"; dropped afterwards."""
    name = f"{psycopg.conninfo.conninfo_to_dict(settings.database_url)['dbname']}_{suffix}"
    scratch = settings.replace(database_url=psycopg.conninfo.make_conninfo(settings.database_url, dbname=name))
    migrate(scratch)
    try:
        service = bootstrap(scratch, pool_size=2)
        try:
            a = open_account(service, "scratch")
            credit(service, "scratch", a, 10)
        finally:
            service.close()
        yield scratch, a
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_verify_reports_entries_whose_transaction_or_account_is_missing(settings: Settings) -> None:
    with scratch_ledger(settings, "scratch") as (scratch, a):
        with psycopg.connect(scratch.database_url, autocommit=True) as conn:
            assert verify(conn) == []
            conn.execute(
                "INSERT INTO entries (transaction_id, tenant_id, account_id, sequence, amount, currency,"
                " balance_after, created_at)"
                " VALUES (%s, 'scratch', %s, 99, 1, 'USD', 1, now())",
                (uuid.uuid4(), a),
            )
            found = {v.check for v in verify(conn)}
        assert "every entry belongs to an existing transaction and account" in found


def test_no_client_can_take_a_system_account_id(ledger: LedgerService, tenant: str) -> None:
    victim = f"{tenant}-victim"
    squatted = external_account_id(victim, "EUR")  # computable by anyone who knows the tenant's name
    for taker, squat in ((tenant, squatted), (victim, squatted), (tenant, external_account_id(tenant, "USD"))):
        with pytest.raises(ValidationFailed, match="v4"):
            CreateAccount(taker, "EUR", account_id=squat)
    # The victim's credits and debits in that currency keep working.
    a = open_account(ledger, victim, "EUR")
    assert credit(ledger, victim, a, 100, "EUR").status is OperationStatus.SUCCEEDED
    assert ledger.queries.account(victim, squatted) is not None  # its external account, as the ledger made it
    # Random and time-ordered ids remain the client's to choose.
    for chosen in (uuid.uuid4(), new_id()):
        made = ledger.execute(CreateAccount(tenant, "EUR", account_id=chosen), idempotency_key=key())
        assert made.status is OperationStatus.SUCCEEDED


def test_verify_reports_a_customer_account_on_a_system_id_and_a_misplaced_system_account(settings: Settings) -> None:
    with scratch_ledger(settings, "squat") as (scratch, _):
        with psycopg.connect(scratch.database_url, autocommit=True) as conn:
            assert verify(conn) == []
            # What the squatting attack left behind before ids were checked, and a system account elsewhere.
            conn.execute(
                "INSERT INTO accounts (id, tenant_id, currency, kind, overdraft_limit)"
                " VALUES (%s, 'scratch', 'EUR', 'customer', 0)",
                (external_account_id("other", "EUR"),),
            )
            conn.execute(
                "INSERT INTO accounts (id, tenant_id, currency, kind, system_role, overdraft_limit)"
                " VALUES (%s, 'scratch', 'GBP', 'system', 'external', NULL)",
                (uuid.uuid4(),),
            )
            found = {v.check for v in verify(conn)}
        assert found == {
            "no customer account sits on a derived (version 5, system) id",
            "every system account sits on the id derived from its tenant and currency",
        }


def test_verify_reports_a_closed_account_that_holds_money(settings: Settings) -> None:
    with scratch_ledger(settings, "closed") as (scratch, a), psycopg.connect(scratch.database_url) as conn:
        conn.autocommit = True
        assert verify(conn) == []
        conn.execute("UPDATE accounts SET status = 'closed' WHERE id = %s", (a,))  # closed while holding 10
        found = {v.check for v in verify(conn)}
    assert found == {"a closed account holds nothing (it closes only at zero, and nothing posts to it after)"}
