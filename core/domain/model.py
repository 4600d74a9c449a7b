"""Accounts, entries and transactions: the ledger's entities and their invariants."""

from __future__ import annotations

import enum
import functools
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from core.domain.errors import (
    AccountClosed,
    AccountFrozen,
    AccountHasOpenHolds,
    AccountNotEmpty,
    BalanceLimitExceeded,
    CaptureExceedsHold,
    CurrencyMismatch,
    HoldExpired,
    HoldNotPending,
    InsufficientFunds,
    LedgerError,
    MetadataInvalid,
    RequestInvalid,
    ReversalExceedsOriginal,
    TransactionNotReversible,
    ValidationFailed,
)
from core.domain.money import MAX_BALANCE, validate_currency

# Serialized size cap of a transaction's or account's metadata, in bytes of compact UTF-8 JSON.
MAX_METADATA_BYTES = 4096
# Most keys one metadata object may hold.
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_CHARS = 64  # characters of one metadata key
MAX_METADATA_VALUE_CHARS = 512  # characters of one metadata value (a string)
TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class AccountKind(enum.StrEnum):
    CUSTOMER = "customer"
    SYSTEM = "system"


class AccountStatus(enum.StrEnum):
    OPEN = "open"
    FROZEN = "frozen"
    CLOSED = "closed"


class HoldStatus(enum.StrEnum):
    PENDING = "pending"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


class TransactionKind(enum.StrEnum):
    CREDIT = "credit"
    DEBIT = "debit"
    TRANSFER = "transfer"
    MULTI_LEG = "multi_leg"
    REVERSAL = "reversal"
    CAPTURE = "capture"


def validate_tenant_id(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not _is_tenant_id(tenant_id):
        raise RequestInvalid("tenant id must be 1-63 characters of a-z, 0-9, '_' or '-'")
    return tenant_id


@functools.lru_cache(maxsize=4096)
def _is_tenant_id(tenant_id: str) -> bool:
    """Checked for every account and command a group settles (a batch's 1,000 items): the few tenants of a
    process are remembered rather than matched again."""
    return TENANT_ID_PATTERN.fullmatch(tenant_id) is not None


def validate_metadata(metadata: object) -> dict[str, Any]:
    """Metadata is a flat JSON object of strings: at most MAX_METADATA_KEYS keys of 1 to MAX_METADATA_KEY_CHARS
    characters, values of at most MAX_METADATA_VALUE_CHARS, MAX_METADATA_BYTES in all as compact UTF-8 JSON.

    Strings only, so that what is stored, filtered on and replayed is exactly what was sent: PostgreSQL's jsonb
    keeps a JSON number as a numeric and gives back another spelling of it (1.5e20 comes back as
    150000000000000000000, and the command no longer matches its fingerprint), and most clients parse numbers
    as doubles (9007199254740993 becomes ...992). A client sends "9007199254740993" and gets it back."""
    if not isinstance(metadata, dict):
        raise MetadataInvalid("metadata must be a JSON object")
    if not metadata:
        return metadata
    if len(metadata) > MAX_METADATA_KEYS:
        raise MetadataInvalid(f"metadata may hold at most {MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
            raise MetadataInvalid(f"metadata keys must be strings of 1 to {MAX_METADATA_KEY_CHARS} characters")
        if not isinstance(value, str):
            raise MetadataInvalid(
                f"metadata values must be strings (write numbers as strings, which keep every digit): "
                f"{key[:40]!r} is a {json_type(value)}"
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise MetadataInvalid(f"a metadata value may hold at most {MAX_METADATA_VALUE_CHARS} characters")
        if "\x00" in key or "\x00" in value:
            # PostgreSQL refuses U+0000 in jsonb and text: caught here it is the client's 422, not a failed insert.
            raise MetadataInvalid("metadata keys and strings must not contain the NUL character (U+0000)")
    encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)
    try:
        size = len(encoded.encode())
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no UTF-8 for it, nor in PostgreSQL
        raise MetadataInvalid("metadata keys and strings must be valid Unicode (no lone surrogates)") from None
    if size > MAX_METADATA_BYTES:
        raise MetadataInvalid(f"metadata must not exceed {MAX_METADATA_BYTES} bytes as JSON")
    return metadata


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


@dataclass(frozen=True, slots=True)
class OverdraftPolicy:
    """How far below zero a customer account may go.

    `limit` None means unrestricted (system accounts); 0 means debits must not exceed credits.
    """

    limit: int | None = 0

    def __post_init__(self) -> None:
        if self.limit is not None and (type(self.limit) is not int or not 0 <= self.limit <= MAX_BALANCE):
            # A body field out of range, like an amount or a currency: 422, whatever transport carried it.
            raise ValidationFailed(f"overdraft limit must be an integer between 0 and {MAX_BALANCE}")

    @property
    def debits_must_not_exceed_credits(self) -> bool:
        return self.limit == 0

    def floor(self) -> int:
        """The lowest balance allowed, in minor units."""
        return -MAX_BALANCE if self.limit is None else -self.limit


# An account's full name: account ids are scoped per tenant, so two tenants may hold the same id.
AccountKey = tuple[str, UUID]


@dataclass(frozen=True, slots=True)
class Entry:
    """One immutable line of the ledger: a signed amount (credit > 0, debit < 0) against one account.

    `sequence` numbers an account's entries 1, 2, 3...; `balance_after` is the account's posted balance
    once this entry applied, so the chain can be re-verified from the entries alone.
    """

    account_id: UUID
    amount: int
    currency: str
    sequence: int
    balance_after: int


@dataclass(slots=True)
class Account:
    """An account. The balance is the sum of its entries (credits minus debits), in minor units."""

    id: UUID
    tenant_id: str
    currency: str
    kind: AccountKind
    overdraft: OverdraftPolicy
    status: AccountStatus = AccountStatus.OPEN
    balance: int = 0
    version: int = 0  # number of entries posted so far; the next entry's sequence is version + 1
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    pending_debits: int = 0  # held from this account by pending holds, in minor units
    pending_credits: int = 0  # held toward this account by pending holds

    @property
    def available(self) -> int:
        """What the account may still spend down to its floor counts from: posted minus pending debits.
        Pending credits are not counted until captured."""
        return self.balance - self.pending_debits

    def __post_init__(self) -> None:
        validate_currency(self.currency)
        validate_tenant_id(self.tenant_id)

    @property
    def key(self) -> AccountKey:
        return (self.tenant_id, self.id)

    def ensure_postable(self) -> None:
        if self.status is AccountStatus.FROZEN:
            raise AccountFrozen(f"account {self.id} is frozen", account_id=str(self.id))
        if self.status is AccountStatus.CLOSED:
            raise AccountClosed(f"account {self.id} is closed", account_id=str(self.id))

    def post(self, amount: int) -> Entry:
        """Apply a signed amount, enforcing status and limits; returns the entry that records it."""
        self.ensure_postable()
        new_balance = self.balance + amount
        if amount < 0 and new_balance - self.pending_debits < self.overdraft.floor():
            if self.overdraft.limit is not None:
                raise InsufficientFunds(
                    f"account {self.id} cannot go below {self.overdraft.floor()}",
                    account_id=str(self.id),
                    balance=self.balance,
                    requested=-amount,
                )
            raise BalanceLimitExceeded(account_id=str(self.id))
        if new_balance > MAX_BALANCE:
            raise BalanceLimitExceeded(account_id=str(self.id))
        self.balance = new_balance
        self.version += 1
        return Entry(self.id, amount, self.currency, self.version, new_balance)

    def patch_metadata(self, patch: dict[str, str | None]) -> None:
        """Apply a JSON merge patch (a string sets its key, None removes it); the result must stay valid."""
        merged = {key: value for key, value in self.metadata.items() if key not in patch}
        merged.update({key: value for key, value in patch.items() if value is not None})
        self.metadata = validate_metadata(merged)

    def change_status(self, status: AccountStatus) -> None:
        if self.status is AccountStatus.CLOSED:
            raise AccountClosed(f"account {self.id} is closed", account_id=str(self.id))
        if status is AccountStatus.CLOSED and self.balance != 0:
            raise AccountNotEmpty(f"account {self.id} holds {self.balance}", account_id=str(self.id))
        if status is AccountStatus.CLOSED and (self.pending_debits or self.pending_credits):
            raise AccountHasOpenHolds(f"account {self.id} has pending holds", account_id=str(self.id))
        self.status = status

    def hold_debit(self, amount: int) -> None:
        """Set `amount` aside for a hold from this account: it stays posted, but is no longer available."""
        self.ensure_postable()
        if self.available - amount < self.overdraft.floor():
            if self.overdraft.limit is None:
                raise BalanceLimitExceeded(account_id=str(self.id))
            raise InsufficientFunds(
                f"account {self.id} cannot go below {self.overdraft.floor()}",
                account_id=str(self.id),
                balance=self.balance,
                available=self.available,
                requested=amount,
            )
        self.pending_debits += amount

    def hold_credit(self, amount: int) -> None:
        """Note `amount` held toward this account; it counts for nothing until captured."""
        self.ensure_postable()
        if self.balance + self.pending_credits + amount > MAX_BALANCE:
            raise BalanceLimitExceeded(account_id=str(self.id))
        self.pending_credits += amount

    def release_debit(self, amount: int) -> None:
        self.pending_debits -= amount

    def release_credit(self, amount: int) -> None:
        self.pending_credits -= amount


@dataclass(frozen=True, slots=True)
class Transaction:
    """A balanced set of entries posted atomically."""

    id: UUID
    tenant_id: str
    kind: TransactionKind
    entries: tuple[Entry, ...]
    metadata: Mapping[str, Any]
    created_at: datetime
    reverses: UUID | None = None  # a reversal: the transaction it mirrors

    @property
    def amount_moved(self) -> int:
        """The sum of its credits (equal to its debits), in minor units: what reversing it in full moves."""
        return sum(entry.amount for entry in self.entries if entry.amount > 0)

    def __post_init__(self) -> None:
        if (self.kind is TransactionKind.REVERSAL) != (self.reverses is not None):
            raise LedgerError("a reversal, and only a reversal, names the transaction it reverses")
        if len(self.entries) < 2:
            raise LedgerError("a transaction needs at least two entries")
        totals: dict[str, int] = defaultdict(int)
        for entry in self.entries:
            if entry.amount == 0:
                raise LedgerError("an entry must move a non-zero amount")
            totals[entry.currency] += entry.amount
        if any(totals.values()):
            raise LedgerError(f"unbalanced transaction: {dict(totals)}")


def post_legs(
    *,
    transaction_id: UUID,
    tenant_id: str,
    kind: TransactionKind,
    legs: Sequence[tuple[Account, int]],
    metadata: Mapping[str, Any],
    created_at: datetime,
    reverses: UUID | None = None,
) -> Transaction:
    """Post signed legs against accounts already locked by the caller; all or nothing.

    Legs are applied debits first so the rejection a caller sees names the account short of funds. If one
    leg fails, the accounts' in-memory state is restored before the error propagates.
    """
    snapshot = [(account, account.balance, account.version) for account, _ in legs]
    try:
        entries = tuple(account.post(amount) for account, amount in sorted(legs, key=lambda leg: leg[1]))
        return Transaction(transaction_id, tenant_id, kind, entries, metadata, created_at, reverses)
    except LedgerError:
        for account, balance, version in snapshot:
            account.balance, account.version = balance, version
        raise


def reversal_legs(original: Transaction, *, amount: int | None, reversed_so_far: int) -> list[tuple[UUID, int, str]]:
    """Signed legs (account, amount, currency) that reverse `original`: all of what is left of it when `amount`
    is None, else `amount` of it. `reversed_so_far` is what earlier reversals of it moved (`amount_moved`).

    A two-entry transaction (a credit, a debit, a transfer) may be reversed in parts, each mirroring both
    entries for its amount; a larger one only in full, at once. Reversals never move more, together, than the
    original did."""
    if original.kind is TransactionKind.REVERSAL:
        raise TransactionNotReversible(
            f"transaction {original.id} is a reversal; post the original again instead", transaction_id=str(original.id)
        )
    left = original.amount_moved - reversed_so_far
    if amount is None:
        amount = left
    if left == 0 or amount > left:
        raise ReversalExceedsOriginal(
            f"transaction {original.id} has {left} left to reverse", transaction_id=str(original.id), remaining=left
        )
    if len(original.entries) == 2:
        return [(e.account_id, -amount if e.amount > 0 else amount, e.currency) for e in original.entries]
    if amount != original.amount_moved:
        raise TransactionNotReversible(
            f"transaction {original.id} has {len(original.entries)} entries: it is reversed in full or not at all",
            transaction_id=str(original.id),
        )
    return [(e.account_id, -e.amount, e.currency) for e in original.entries]


@dataclass(slots=True)
class Hold:
    """A two-phase posting: `amount` set aside on the source toward the destination while pending, then
    captured (all or part of it posted), voided or expired (released), exactly once."""

    id: UUID
    tenant_id: str
    source_id: UUID
    destination_id: UUID
    currency: str
    amount: int
    expires_at: datetime | None
    created_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    status: HoldStatus = HoldStatus.PENDING
    captured_amount: int | None = None
    capture_transaction_id: UUID | None = None

    @property
    def key(self) -> tuple[str, UUID]:
        return (self.tenant_id, self.id)

    def expired_at(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def ensure_pending(self) -> None:
        if self.status is not HoldStatus.PENDING:
            raise HoldNotPending(f"hold {self.id} is {self.status}", hold_id=str(self.id), hold_status=str(self.status))

    def capture_amount(self, amount: int | None, now: datetime) -> int:
        """What a capture of `amount` (None: all of it) posts; refuses a hold that is not pending or expired."""
        self.ensure_pending()
        if self.expired_at(now):
            raise HoldExpired(f"hold {self.id} expired at {self.expires_at}", hold_id=str(self.id))
        if amount is None:
            return self.amount
        if amount > self.amount:
            raise CaptureExceedsHold(
                f"hold {self.id} holds {self.amount}", hold_id=str(self.id), held=self.amount, requested=amount
            )
        return amount

    def release(self, source: Account, destination: Account, status: HoldStatus) -> None:
        """Give the held amount back to both accounts, and end the hold as `status`."""
        source.release_debit(self.amount)
        destination.release_credit(self.amount)
        self.status = status

    def reopen(self, source: Account, destination: Account) -> None:
        """Undo `release`: a capture whose posting was refused leaves the hold as it was."""
        source.pending_debits += self.amount
        destination.pending_credits += self.amount
        self.status = HoldStatus.PENDING


def place_hold(hold: Hold, source: Account, destination: Account) -> None:
    """Set a new hold's amount aside on both accounts (locked by the caller); all or nothing."""
    if source.currency != hold.currency or destination.currency != hold.currency:
        wrong = source if source.currency != hold.currency else destination
        raise CurrencyMismatch(
            f"account {wrong.id} holds {wrong.currency}, not {hold.currency}", account_id=str(wrong.id)
        )
    source.hold_debit(hold.amount)
    try:
        destination.hold_credit(hold.amount)
    except LedgerError:
        source.release_debit(hold.amount)
        raise
