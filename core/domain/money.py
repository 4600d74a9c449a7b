"""Money: integer minor units plus an ISO-4217 currency. Never a float."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from core.domain.errors import AmountInvalid, CurrencyInvalid, CurrencyMismatch

# Largest amount one posting may move, in minor units (10^15 - 1: about 10 trillion USD, 1 quadrillion JPY).
MAX_POSTING_AMOUNT = 10**15 - 1
# Largest magnitude a stored balance may reach, in minor units. 2^62 keeps `balance + MAX_POSTING_AMOUNT`
# far inside PostgreSQL's BIGINT (2^63 - 1), so no arithmetic anywhere can overflow.
MAX_BALANCE = 2**62

# Active ISO-4217 codes and their exponent (number of minor-unit digits). Funds codes and precious
# metals (XAU, XDR, ...) are deliberately absent: a ledger of money should not accept them by accident.
CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP BYN BZD CAD "
        "CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD "
        "HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD "
        "MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON "
        "RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD "
        "TZS UAH USD UYU UZS VES WST XCD YER ZAR ZMW ZWG".split(),
        2,
    ),
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}


def currency_exponent(code: str) -> int:
    """The exponent of an ISO-4217 code; raises `CurrencyInvalid` for anything else."""
    try:
        return CURRENCY_EXPONENTS[code]
    except (KeyError, TypeError):
        raise CurrencyInvalid(f"{code!r} is not a supported ISO-4217 currency code") from None


def validate_currency(code: object) -> str:
    if not isinstance(code, str):
        raise CurrencyInvalid("currency must be a three-letter ISO-4217 code")
    currency_exponent(code)
    return code


@dataclass(frozen=True, slots=True)
class Money:
    """A non-negative amount of one currency, in minor units (cents for USD, yen for JPY, fils for BHD)."""

    amount: int
    currency: str

    def __post_init__(self) -> None:
        # bool is an int subclass; True cents is a bug, not an amount.
        if type(self.amount) is not int:
            raise AmountInvalid("amount must be an integer number of minor units")
        if self.amount < 0:
            raise AmountInvalid("amount must not be negative")
        validate_currency(self.currency)

    @classmethod
    def for_posting(cls, amount: object, currency: object) -> Money:
        """An amount one posting may move: 1 ..= MAX_POSTING_AMOUNT minor units."""
        if type(amount) is not int:
            raise AmountInvalid("amount must be an integer number of minor units")
        if amount <= 0:
            raise AmountInvalid("amount must be greater than zero")
        if amount > MAX_POSTING_AMOUNT:
            raise AmountInvalid(f"amount must not exceed {MAX_POSTING_AMOUNT} minor units")
        return cls(amount, validate_currency(currency))

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENTS[self.currency]

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}")

    def to_decimal(self) -> Decimal:
        """The major-unit value, exact (Decimal, not float): Money(1234, 'USD') -> Decimal('12.34')."""
        return Decimal(self.amount).scaleb(-self.exponent)

    def __str__(self) -> str:
        return f"{self.to_decimal():.{self.exponent}f} {self.currency}"
