"""Request bodies, the one schema of every way in (HTTP and direct AMQP): pydantic models, strict, no unknown
fields. `BODIES` names each body by its command type, which is also its AMQP routing key.

Types are checked here (an amount must be a JSON integer, ids UUID strings); the business bounds (amount > 0,
known currency, metadata size...) are the domain's, so HTTP and AMQP reject the same things with the same codes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from core.application.commands import (
    MAX_BATCH_ITEMS,
    MAX_LEGS,
    Batch,
    CaptureHold,
    ChangeAccountStatus,
    Command,
    CreateAccount,
    CreateHold,
    Credit,
    Debit,
    Leg,
    PostTransaction,
    ReverseTransaction,
    Transfer,
    UpdateAccountMetadata,
    VoidHold,
)
from core.domain.errors import LedgerError, RequestInvalid, ValidationFailed
from core.domain.model import AccountStatus, OverdraftPolicy
from core.domain.money import Money


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def to_command(self, tenant_id: str) -> Command:
        raise NotImplementedError


class CreateAccountBody(Body):
    currency: str
    overdraft_limit: int = 0  # minor units the account may go below zero; 0 = debits must not exceed credits
    metadata: dict[str, Any] = Field(default_factory=dict)
    id: UUID | None = None  # optional client-chosen account id

    def to_command(self, tenant_id: str) -> Command:
        return CreateAccount(tenant_id, self.currency, OverdraftPolicy(self.overdraft_limit), self.metadata, self.id)


class CreditBody(Body):
    account_id: UUID
    amount: int  # minor units
    currency: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_command(self, tenant_id: str) -> Command:
        return Credit(tenant_id, self.account_id, Money.for_posting(self.amount, self.currency), self.metadata)


class DebitBody(CreditBody):
    def to_command(self, tenant_id: str) -> Command:
        return Debit(tenant_id, self.account_id, Money.for_posting(self.amount, self.currency), self.metadata)


class TransferBody(Body):
    source_id: UUID
    destination_id: UUID
    amount: int  # minor units
    currency: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_command(self, tenant_id: str) -> Command:
        money = Money.for_posting(self.amount, self.currency)
        return Transfer(tenant_id, self.source_id, self.destination_id, money, self.metadata)


class LegBody(Body):
    account_id: UUID
    amount: int  # signed minor units: > 0 credits the account, < 0 debits it
    currency: str


class TransactionBody(Body):
    """`POST /v1/transactions`: up to MAX_LEGS legs, summing to zero per currency, posted all or none."""

    legs: list[LegBody] = Field(max_length=MAX_LEGS)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_command(self, tenant_id: str) -> Command:
        legs = tuple(Leg(leg.account_id, leg.amount, leg.currency) for leg in self.legs)
        return PostTransaction(tenant_id, legs, self.metadata)


class ReversalBody(Body):
    """`POST /v1/transactions/{id}/reverse`: the transaction is the path's. No amount: all that is left of it."""

    amount: int | None = None  # minor units, in the original's currency; two-entry transactions only
    metadata: dict[str, Any] = Field(default_factory=dict)


class ReverseTransactionBody(ReversalBody):
    """A reversal over AMQP or in a batch, naming its transaction."""

    transaction_id: UUID

    def to_command(self, tenant_id: str) -> Command:
        return ReverseTransaction(tenant_id, self.transaction_id, self.amount, self.metadata)


class HoldBody(Body):
    """`POST /v1/holds`: reserve `amount` on the source toward the destination, until captured, voided or
    `expires_at` (RFC 3339 with its offset, at most 30 days ahead; none: no expiry)."""

    source_id: UUID
    destination_id: UUID
    amount: int  # minor units
    currency: str
    expires_at: AwareDatetime | None = Field(default=None, strict=False)  # from its RFC 3339 text
    metadata: dict[str, Any] = Field(default_factory=dict)
    id: UUID | None = None  # optional client-chosen hold id

    def to_command(self, tenant_id: str) -> Command:
        money = Money.for_posting(self.amount, self.currency)
        return CreateHold(
            tenant_id, self.source_id, self.destination_id, money, self.expires_at, self.metadata, self.id
        )


class CaptureBody(Body):
    """`POST /v1/holds/{id}/capture`: the hold is the path's. No amount: all of it."""

    amount: int | None = None  # minor units; what is not captured is released
    metadata: dict[str, Any] = Field(default_factory=dict)


class CaptureHoldBody(CaptureBody):
    """A capture over AMQP, naming its hold."""

    hold_id: UUID

    def to_command(self, tenant_id: str) -> Command:
        return CaptureHold(tenant_id, self.hold_id, self.amount, self.metadata)


class VoidHoldBody(Body):
    """A void over AMQP, naming its hold (over HTTP: `POST /v1/holds/{id}/void`)."""

    hold_id: UUID

    def to_command(self, tenant_id: str) -> Command:
        return VoidHold(tenant_id, self.hold_id)


class AccountStatusBody(Body):
    """Freeze (no posting either way), unfreeze (`open`) or close (for good; only at a zero balance)."""

    account_id: UUID
    status: Literal["open", "frozen", "closed"]

    def to_command(self, tenant_id: str) -> Command:
        return ChangeAccountStatus(tenant_id, self.account_id, AccountStatus(self.status))


class AccountMetadataBody(Body):
    """A JSON merge patch of an account's metadata: a string sets its key, null removes it."""

    account_id: UUID
    metadata: dict[str, Any]

    def to_command(self, tenant_id: str) -> Command:
        return UpdateAccountMetadata(tenant_id, self.account_id, self.metadata)


class MetadataPatchBody(Body):
    """`PATCH /v1/accounts/{id}`: the account is the path's."""

    metadata: dict[str, Any]


class EmptyBody(Body):
    """What a POST whose path says it all may carry: nothing, or `{}`."""


# A batch's items: each command's own body, named by its command type.
class BatchCreateAccount(CreateAccountBody):
    type: Literal["create_account"]


class BatchCredit(CreditBody):
    type: Literal["credit"]


class BatchDebit(DebitBody):
    type: Literal["debit"]


class BatchTransfer(TransferBody):
    type: Literal["transfer"]


class BatchTransaction(TransactionBody):
    type: Literal["post_transaction"]


class BatchReversal(ReverseTransactionBody):
    type: Literal["reverse_transaction"]


BatchItem = Annotated[
    BatchCreateAccount | BatchCredit | BatchDebit | BatchTransfer | BatchTransaction | BatchReversal,
    Field(discriminator="type"),
]


class BatchBody(Body):
    """`POST /v1/batches`: up to MAX_BATCH_ITEMS independent commands under one idempotency key, each settling
    on its own. An item that fails validation fails the whole request (422, with its index as `item`)."""

    items: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)

    def to_command(self, tenant_id: str) -> Command:
        commands = []
        for index, item in enumerate(self.items):
            try:
                commands.append(item.to_command(tenant_id))
            except LedgerError as error:
                error.extensions.setdefault("item", index)
                raise
        return Batch(tenant_id, tuple(commands))


# Body of each command a client may send, by command type (HTTP route and AMQP routing key alike).
BODIES: dict[str, type[Body]] = {
    CreateAccount.type: CreateAccountBody,
    Credit.type: CreditBody,
    Debit.type: DebitBody,
    Transfer.type: TransferBody,
    ChangeAccountStatus.type: AccountStatusBody,
    UpdateAccountMetadata.type: AccountMetadataBody,
    PostTransaction.type: TransactionBody,
    ReverseTransaction.type: ReverseTransactionBody,
    CreateHold.type: HoldBody,
    CaptureHold.type: CaptureHoldBody,
    VoidHold.type: VoidHoldBody,
    Batch.type: BatchBody,
}


B = TypeVar("B", bound=Body)


def parse_body(model: type[B], raw: bytes) -> B:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def validation_problem(exc: ValidationError, *, status: int = 422) -> RequestInvalid | ValidationFailed:
    errors = [
        {"field": ".".join(str(part) for part in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    if any(err["type"] == "json_invalid" for err in exc.errors()):
        return RequestInvalid("the body is not valid JSON", errors=errors)
    if status == 400:
        return RequestInvalid("invalid query parameters", errors=errors)
    return ValidationFailed("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)
