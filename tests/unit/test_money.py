from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain.errors import AmountInvalid, CurrencyInvalid, CurrencyMismatch
from core.domain.money import CURRENCY_EXPONENTS, MAX_POSTING_AMOUNT, Money, currency_exponent

currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))
posting_amounts = st.integers(min_value=1, max_value=MAX_POSTING_AMOUNT)


@pytest.mark.parametrize(("code", "exponent"), [("USD", 2), ("EUR", 2), ("JPY", 0), ("KRW", 0), ("BHD", 3), ("KWD", 3)])
def test_currency_exponents_follow_iso_4217(code: str, exponent: int) -> None:
    assert currency_exponent(code) == exponent


@pytest.mark.parametrize("code", ["usd", "US", "USDD", "XXX", "XAU", "", None, 840])
def test_unknown_or_malformed_currency_is_rejected(code: object) -> None:
    with pytest.raises(CurrencyInvalid):
        Money.for_posting(100, code)


@pytest.mark.parametrize("amount", [1.0, 10.5, True, "100", None, Decimal("1")])
def test_non_integer_amounts_are_rejected(amount: object) -> None:
    with pytest.raises(AmountInvalid):
        Money.for_posting(amount, "USD")


@pytest.mark.parametrize("amount", [0, -1, MAX_POSTING_AMOUNT + 1, 2**63])
def test_posting_amount_bounds(amount: int) -> None:
    with pytest.raises(AmountInvalid):
        Money.for_posting(amount, "USD")


@given(posting_amounts, currencies)
def test_any_amount_within_bounds_is_accepted_exactly(amount: int, currency: str) -> None:
    money = Money.for_posting(amount, currency)
    assert money.amount == amount
    # Decimal conversion is exact: scaling back gives the same integer, no float rounding anywhere.
    assert money.to_decimal().scaleb(money.exponent) == amount


@given(posting_amounts, posting_amounts, currencies)
def test_addition_and_subtraction_are_exact_inverses(a: int, b: int, currency: str) -> None:
    x, y = Money(a, currency), Money(b, currency)
    assert (x + y) - y == x


@given(posting_amounts, currencies, currencies)
def test_mixing_currencies_is_refused(amount: int, c1: str, c2: str) -> None:
    if c1 == c2:
        return
    with pytest.raises(CurrencyMismatch):
        Money(amount, c1) + Money(amount, c2)


def test_string_form_uses_the_currency_exponent() -> None:
    assert str(Money(1234, "USD")) == "12.34 USD"
    assert str(Money(1234, "JPY")) == "1234 JPY"
    assert str(Money(1234, "BHD")) == "1.234 BHD"
    assert str(Money(5, "USD")) == "0.05 USD"
