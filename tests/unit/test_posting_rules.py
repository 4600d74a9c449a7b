"""Posting rules on in-memory accounts: pure domain, no database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.domain.errors import (
    AccountClosed,
    AccountFrozen,
    AccountNotEmpty,
    BalanceLimitExceeded,
    InsufficientFunds,
    LedgerError,
)
from core.domain.ids import new_id
from core.domain.model import (
    Account,
    AccountKind,
    AccountStatus,
    OverdraftPolicy,
    TransactionKind,
    post_legs,
)
from core.domain.money import MAX_BALANCE

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def account(limit: int | None = 0, balance: int = 0, kind: AccountKind = AccountKind.CUSTOMER) -> Account:
    return Account(new_id(), "acme", "USD", kind, OverdraftPolicy(limit), balance=balance)


def transfer(src: Account, dst: Account, amount: int) -> None:
    post_legs(
        transaction_id=new_id(),
        tenant_id="acme",
        kind=TransactionKind.TRANSFER,
        legs=[(src, -amount), (dst, amount)],
        metadata={},
        created_at=NOW,
    )


def test_no_overdraft_account_cannot_go_negative_and_is_left_untouched() -> None:
    src, dst = account(balance=100), account()
    with pytest.raises(InsufficientFunds) as info:
        transfer(src, dst, 101)
    assert info.value.code == "insufficient-funds"
    assert (src.balance, src.version, dst.balance, dst.version) == (100, 0, 0, 0)


def test_overdraft_limit_allows_going_down_to_minus_limit_exactly() -> None:
    src, dst = account(limit=500), account()
    transfer(src, dst, 500)
    assert src.balance == -500
    with pytest.raises(InsufficientFunds):
        transfer(src, dst, 1)


def test_system_account_may_go_negative() -> None:
    external, customer = account(limit=None, kind=AccountKind.SYSTEM), account()
    transfer(external, customer, 10**12)
    assert external.balance == -(10**12)


def test_entries_chain_sequence_and_balance_after() -> None:
    src, dst = account(balance=1000), account()
    transfer(src, dst, 300)
    transfer(src, dst, 200)
    assert (src.version, src.balance, dst.version, dst.balance) == (2, 500, 2, 500)


@pytest.mark.parametrize(
    ("status", "error"), [(AccountStatus.FROZEN, AccountFrozen), (AccountStatus.CLOSED, AccountClosed)]
)
def test_frozen_and_closed_accounts_refuse_postings_both_ways(status: AccountStatus, error: type[LedgerError]) -> None:
    blocked, other = account(limit=None), account(limit=None)
    blocked.status = status
    with pytest.raises(error):
        transfer(blocked, other, 1)
    with pytest.raises(error):
        transfer(other, blocked, 1)
    assert other.balance == 0


def test_balance_cannot_leave_the_representable_range() -> None:
    rich, source = account(balance=MAX_BALANCE), account(limit=None, kind=AccountKind.SYSTEM)
    with pytest.raises(BalanceLimitExceeded):
        transfer(source, rich, 1)


def test_closing_needs_a_zero_balance() -> None:
    acc = account(balance=1)
    with pytest.raises(AccountNotEmpty):
        acc.change_status(AccountStatus.CLOSED)
    acc.balance = 0
    acc.change_status(AccountStatus.CLOSED)
    with pytest.raises(AccountClosed):
        acc.change_status(AccountStatus.OPEN)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 5_000)),
        min_size=1,
        max_size=60,
    )
)
def test_random_postings_conserve_money_and_respect_limits(moves: list[tuple[int, int, int]]) -> None:
    external = account(limit=None, kind=AccountKind.SYSTEM)
    accounts = [external, account(limit=0), account(limit=1_000), account(limit=0)]
    for src, dst, amount in moves:
        if src == dst:
            continue
        before = [(a.balance, a.version) for a in accounts]
        try:
            transfer(accounts[src], accounts[dst], amount)
        except InsufficientFunds:
            assert [(a.balance, a.version) for a in accounts] == before
    assert sum(a.balance for a in accounts) == 0
    for acc in accounts:
        assert acc.balance >= acc.overdraft.floor()
