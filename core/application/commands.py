"""Commands: what a client asks the ledger to do. Immutable, validated on construction, JSON round-trippable.

The JSON form is the wire format on RabbitMQ and the stored request of an operation; its canonical
encoding (sorted keys, no whitespace) is hashed into the idempotency fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID

import orjson

from core.domain.errors import AmountInvalid, IdempotencyKeyInvalid, MetadataInvalid, SameAccount, ValidationFailed
from core.domain.model import AccountStatus, OverdraftPolicy, validate_metadata, validate_tenant_id
from core.domain.money import MAX_POSTING_AMOUNT, Money, validate_currency

# UUID versions a client may choose an account id from: random (4) and time-ordered (7). System accounts' ids
# are derived (version 5, `core.domain.ids.external_account_id`).
CLIENT_ID_VERSIONS = frozenset({4, 7})
# Idempotency keys: 1-255 printable ASCII characters, no spaces (UUIDs, ULIDs, "order-123:attempt-1"...).
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")


def canonical_json(body: dict[str, Any]) -> bytes:
    """A command's JSON form as the fingerprint hashes it: keys sorted, no whitespace, UTF-8 unescaped, byte for
    byte what `json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes, so keys
    stored by earlier versions still match. orjson writes it several times faster (the fingerprint of a batch of
    1,000 was a sixth of an ingress node's CPU); an integer beyond 64 bits or a lone surrogate it refuses, and
    then the standard library writes it. A command's JSON form holds no floats, the one type they write apart."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def validate_idempotency_key(key: object) -> str:
    if not isinstance(key, str) or not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise IdempotencyKeyInvalid("Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    return key


@dataclass(frozen=True, slots=True)
class Command:
    """Base: every command belongs to one tenant."""

    type: ClassVar[str] = ""
    tenant_id: str

    def __post_init__(self) -> None:
        validate_tenant_id(self.tenant_id)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            kind = type(value)
            if kind is str or kind is dict or kind is int:  # most fields, first: a batch writes 1,000 commands
                body[name] = value
            elif kind is UUID:
                body[name] = str(value)
            elif isinstance(value, Money):
                body["amount"], body["currency"] = value.amount, value.currency
            elif isinstance(value, OverdraftPolicy):
                body["overdraft_limit"] = value.limit
            elif isinstance(value, UUID | AccountStatus):
                body[name] = str(value)
            elif isinstance(value, datetime):
                body[name] = value.isoformat()
            elif value is not None or name == "account_id":
                body[name] = value
        return body

    def fingerprint(self, body: dict[str, Any] | None = None) -> str:
        """SHA-256 of the canonical JSON form: equal requests, equal fingerprints. `body` is `to_json()`,
        when the caller has it already."""
        body = self.to_json() if body is None else body
        return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True, slots=True)
class CreateAccount(Command):
    type: ClassVar[str] = "create_account"
    currency: str
    overdraft: OverdraftPolicy = field(default_factory=OverdraftPolicy)
    metadata: dict[str, Any] = field(default_factory=dict)
    account_id: UUID | None = None  # None: the ledger assigns one

    def __post_init__(self) -> None:
        super(CreateAccount, self).__post_init__()
        validate_currency(self.currency)
        validate_metadata(self.metadata)
        if self.overdraft.limit is None:
            raise ValidationFailed("customer accounts need an overdraft limit (0 for none)")
        if self.account_id is not None and self.account_id.version not in CLIENT_ID_VERSIONS:
            # The ledger's own accounts have derived (version 5) ids: no client may take one, its own tenant's
            # or another's, and a random or time-ordered id cannot collide with one by chance.
            raise ValidationFailed("a client-chosen account id must be a random (v4) or time-ordered (v7) UUID")


@dataclass(frozen=True, slots=True)
class _OneAccountPosting(Command):
    """Money crossing the ledger's edge: one customer account against the tenant's external account."""

    account_id: UUID
    amount: Money
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super(_OneAccountPosting, self).__post_init__()
        validate_metadata(self.metadata)


@dataclass(frozen=True, slots=True)
class Credit(_OneAccountPosting):
    """Money arrives from outside the ledger: external account -> account."""

    type: ClassVar[str] = "credit"


@dataclass(frozen=True, slots=True)
class Debit(_OneAccountPosting):
    """Money leaves the ledger: account -> external account."""

    type: ClassVar[str] = "debit"


@dataclass(frozen=True, slots=True)
class Transfer(Command):
    type: ClassVar[str] = "transfer"
    source_id: UUID
    destination_id: UUID
    amount: Money
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super(Transfer, self).__post_init__()
        validate_metadata(self.metadata)
        if self.source_id == self.destination_id:
            raise SameAccount()


@dataclass(frozen=True, slots=True)
class ChangeAccountStatus(Command):
    """Freeze, unfreeze or close an account."""

    type: ClassVar[str] = "change_account_status"
    account_id: UUID
    status: AccountStatus


@dataclass(frozen=True, slots=True)
class UpdateAccountMetadata(Command):
    """Change an account's metadata as a JSON merge patch (RFC 7396): a string sets its key, null removes it,
    a key not named stays as it is."""

    type: ClassVar[str] = "update_account_metadata"
    account_id: UUID
    metadata: dict[str, str | None]

    def __post_init__(self) -> None:
        super(UpdateAccountMetadata, self).__post_init__()
        if not isinstance(self.metadata, dict) or not self.metadata:
            raise MetadataInvalid("the metadata patch must be a JSON object naming at least one key")
        validate_metadata({key: "" if value is None else value for key, value in self.metadata.items()})


# Legs one transaction may hold at most.
MAX_LEGS = 100


@dataclass(frozen=True, slots=True)
class Leg:
    """One line of a multi-leg transaction: a signed amount (> 0 credits the account, < 0 debits it)."""

    account_id: UUID
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class PostTransaction(Command):
    """Up to MAX_LEGS legs posted atomically across the tenant's accounts, each currency summing to zero: a
    payment with its fee split, or an exchange through liquidity accounts. All legs post, or none."""

    type: ClassVar[str] = "post_transaction"
    legs: tuple[Leg, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super(PostTransaction, self).__post_init__()
        validate_metadata(self.metadata)
        if not 2 <= len(self.legs) <= MAX_LEGS:
            raise ValidationFailed(f"a transaction has 2 to {MAX_LEGS} legs")
        totals: dict[str, int] = {}
        seen: set[UUID] = set()
        for index, leg in enumerate(self.legs):
            validate_currency(leg.currency)
            if type(leg.amount) is not int or leg.amount == 0 or abs(leg.amount) > MAX_POSTING_AMOUNT:
                raise AmountInvalid(
                    f"leg {index}: an amount is a non-zero integer of at most {MAX_POSTING_AMOUNT} minor units",
                    leg=index,
                )
            if leg.account_id in seen:
                raise ValidationFailed(f"leg {index}: account {leg.account_id} appears twice", leg=index)
            seen.add(leg.account_id)
            totals[leg.currency] = totals.get(leg.currency, 0) + leg.amount
        unbalanced = sorted(currency for currency, total in totals.items() if total != 0)
        if unbalanced:
            raise ValidationFailed(f"the legs must sum to zero in each currency: {', '.join(unbalanced)} do not")

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "tenant_id": self.tenant_id,
            "legs": [
                {"account_id": str(leg.account_id), "amount": leg.amount, "currency": leg.currency} for leg in self.legs
            ],
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class ReverseTransaction(Command):
    """Post the mirror of one of the tenant's transactions, linked to it: all of what is left of it, or `amount`
    of it (a two-entry transaction only). Reversals of one transaction never move more than it did."""

    type: ClassVar[str] = "reverse_transaction"
    transaction_id: UUID
    amount: int | None = None  # minor units; None: all that is left
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super(ReverseTransaction, self).__post_init__()
        validate_metadata(self.metadata)
        if self.amount is not None and (type(self.amount) is not int or not 0 < self.amount <= MAX_POSTING_AMOUNT):
            raise AmountInvalid(f"an amount is an integer from 1 to {MAX_POSTING_AMOUNT} minor units")


# How far ahead a hold may expire, at most.
MAX_HOLD_LIFETIME = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class CreateHold(Command):
    """Set `amount` aside on the source toward the destination (two-phase: captured, voided or expired later).
    While pending it counts against the source's available balance."""

    type: ClassVar[str] = "create_hold"
    source_id: UUID
    destination_id: UUID
    amount: Money
    expires_at: datetime | None = None  # None: until captured or voided
    metadata: dict[str, Any] = field(default_factory=dict)
    hold_id: UUID | None = None  # None: the ledger assigns one

    def __post_init__(self) -> None:
        super(CreateHold, self).__post_init__()
        validate_metadata(self.metadata)
        if self.hold_id is not None and self.hold_id.version not in CLIENT_ID_VERSIONS:
            raise ValidationFailed("a client-chosen hold id must be a random (v4) or time-ordered (v7) UUID")
        if self.source_id == self.destination_id:
            raise SameAccount()
        if self.expires_at is not None and (
            self.expires_at.tzinfo is None or self.expires_at - datetime.now(UTC) > MAX_HOLD_LIFETIME
        ):
            raise ValidationFailed(f"expires_at is a time with its offset, at most {MAX_HOLD_LIFETIME.days} days ahead")


@dataclass(frozen=True, slots=True)
class CaptureHold(Command):
    """Post `amount` of a pending hold (None: all of it) from its source to its destination; what is not
    captured is released. A hold is captured once."""

    type: ClassVar[str] = "capture_hold"
    hold_id: UUID
    amount: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super(CaptureHold, self).__post_init__()
        validate_metadata(self.metadata)
        if self.amount is not None and (type(self.amount) is not int or not 0 < self.amount <= MAX_POSTING_AMOUNT):
            raise AmountInvalid(f"an amount is an integer from 1 to {MAX_POSTING_AMOUNT} minor units")


@dataclass(frozen=True, slots=True)
class VoidHold(Command):
    """Release a pending hold without posting anything."""

    type: ClassVar[str] = "void_hold"
    hold_id: UUID


@dataclass(frozen=True, slots=True)
class ExpireHold(Command):
    """Release a pending hold past its expiry: sent by the expiry sweep (`workers.redeliver`), never by clients,
    under `expiry_key`, so each hold expires once. `as_of` is when the sweep saw it expired (the database's
    clock): the decision travels with the command instead of depending on the settling process's clock."""

    type: ClassVar[str] = "expire_hold"
    hold_id: UUID
    as_of: datetime

    @staticmethod
    def expiry_key(hold_id: UUID) -> str:
        """The idempotency key of a hold's expiry. It holds spaces, which no client's key may (see
        IDEMPOTENCY_KEY_PATTERN), so no request can take it first and keep the hold from expiring."""
        return f"hold expiry {hold_id}"


# The commands that name a hold, whose accounts are read before their unit begins.
HoldCommand = CaptureHold | VoidHold | ExpireHold


# Commands one batch may carry at most.
MAX_BATCH_ITEMS = 1000


@dataclass(frozen=True, slots=True)
class Batch(Command):
    """Up to MAX_BATCH_ITEMS independent commands of one tenant under one idempotency key. Each item settles on
    its own, succeeding or failing as it would alone, in the order given; the batch's operation holds every
    item's outcome. All items settle in the same commit, so a batch costs one commit however long it is."""

    type: ClassVar[str] = "batch"
    items: tuple[Command, ...]

    def __post_init__(self) -> None:
        super(Batch, self).__post_init__()
        if not 1 <= len(self.items) <= MAX_BATCH_ITEMS:
            raise ValidationFailed(f"a batch holds 1 to {MAX_BATCH_ITEMS} commands")
        for index, item in enumerate(self.items):
            if type(item) not in BATCH_ITEM_TYPES:
                raise ValidationFailed(f"item {index}: a batch cannot carry a {item.type!r} command", item=index)
            if item.tenant_id != self.tenant_id:
                raise ValidationFailed(f"item {index}: every item is the batch's tenant's", item=index)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "tenant_id": self.tenant_id, "items": [item.to_json() for item in self.items]}


PostingCommand = Credit | Debit | Transfer | PostTransaction
# What a batch may carry: the commands that create accounts and move money.
BATCH_ITEM_TYPES: frozenset[type[Command]] = frozenset(
    {CreateAccount, Credit, Debit, Transfer, PostTransaction, ReverseTransaction}
)
COMMAND_TYPES: dict[str, type[Command]] = {
    cls.type: cls
    for cls in (
        CreateAccount,
        Credit,
        Debit,
        Transfer,
        ChangeAccountStatus,
        UpdateAccountMetadata,
        PostTransaction,
        ReverseTransaction,
        CreateHold,
        CaptureHold,
        VoidHold,
        ExpireHold,
        Batch,
    )
}


def command_from_json(body: dict[str, Any]) -> Command:
    """Rebuild a command from its JSON form (the queue's wire format); raises a catalogued error."""
    try:
        data = dict(body)
        cls = COMMAND_TYPES[data.pop("type")]
        if cls is Batch:
            return Batch(data["tenant_id"], tuple(command_from_json(item) for item in data["items"]))
        if "amount" in data and "currency" in data:  # money; a reversal's amount is in its original's currency
            data["amount"] = Money.for_posting(data.pop("amount"), data.pop("currency"))
        if "overdraft_limit" in data:
            data["overdraft"] = OverdraftPolicy(data.pop("overdraft_limit"))
        if "legs" in data:
            data["legs"] = tuple(Leg(UUID(leg["account_id"]), leg["amount"], leg["currency"]) for leg in data["legs"])
        for name in ("account_id", "source_id", "destination_id", "transaction_id", "hold_id"):
            if data.get(name) is not None:
                data[name] = UUID(data[name])
        for name in ("expires_at", "as_of"):
            if data.get(name) is not None:
                data[name] = datetime.fromisoformat(data[name])
        if "status" in data:
            data["status"] = AccountStatus(data["status"])
        return cls(**data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValidationFailed(f"not a valid command: {exc}") from None
