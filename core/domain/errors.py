"""The error catalogue: every failure a client can see, with a stable machine code.

One place for the codes. HTTP answers them as RFC 9457 problem documents
(`type` = `https://cleanledger.dev/problems/<code>`), AMQP replies carry the same `code`, and stored operation
results keep it forever, so a code is never renamed once released. `status` is the HTTP status a transport
should use; the domain itself never speaks HTTP.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_TYPE_BASE = "https://cleanledger.dev/problems/"


class LedgerError(Exception):
    """Base of every catalogued error. Subclasses set `code`, `title` and `status`."""

    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500
    # Permanent errors are final answers (stored as the operation's result, never retried);
    # transient ones may succeed if the same command is tried again later.
    permanent: ClassVar[bool] = True

    def __init__(self, detail: str | None = None, **extensions: Any) -> None:
        self.detail = detail or self.title
        self.extensions = extensions
        super().__init__(self.detail)

    def to_problem(self) -> dict[str, Any]:
        """The RFC 9457 body, also the stored form of a rejected operation."""
        return {
            "type": PROBLEM_TYPE_BASE + self.code,
            "code": self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extensions,
        }


# --- input ------------------------------------------------------------------------------------------------
class RequestInvalid(LedgerError):
    code, title, status = "request-invalid", "The request is malformed", 400


class ValidationFailed(LedgerError):
    code, title, status = "validation-failed", "The request body failed validation", 422


class AmountInvalid(LedgerError):
    code, title, status = "amount-invalid", "The amount is not valid", 422


class CurrencyInvalid(LedgerError):
    code, title, status = "currency-invalid", "The currency is not a supported ISO-4217 code", 422


class MetadataInvalid(LedgerError):
    code, title, status = "metadata-invalid", "The metadata is not valid", 422


class IdempotencyKeyMissing(LedgerError):
    code, title, status = "idempotency-key-missing", "An Idempotency-Key header is required", 400


class IdempotencyKeyInvalid(LedgerError):
    code, title, status = "idempotency-key-invalid", "The Idempotency-Key is malformed", 400


class IdempotencyKeyReused(LedgerError):
    code, title, status = (
        "idempotency-key-reused",
        "The Idempotency-Key was already used for a different request",
        422,
    )


class IdempotencyKeyInUse(LedgerError):
    code, title, status = (
        "idempotency-key-in-use",
        "A request with this Idempotency-Key is still being accepted; retry shortly",
        409,
    )
    permanent = False


# --- business rules ---------------------------------------------------------------------------------------
class AccountNotFound(LedgerError):
    code, title, status = "account-not-found", "The account does not exist", 404


class AccountExists(LedgerError):
    code, title, status = "account-exists", "An account with this id already exists", 409


class CurrencyMismatch(LedgerError):
    code, title, status = "currency-mismatch", "The currencies do not match", 422


class SameAccount(LedgerError):
    code, title, status = "same-account", "Source and destination must be different accounts", 422


class InsufficientFunds(LedgerError):
    code, title, status = "insufficient-funds", "The account has insufficient funds", 422


class AccountFrozen(LedgerError):
    code, title, status = "account-frozen", "The account is frozen", 409


class AccountClosed(LedgerError):
    code, title, status = "account-closed", "The account is closed", 409


class AccountNotEmpty(LedgerError):
    code, title, status = "account-not-empty", "Only an account with a zero balance can be closed", 409


class BalanceLimitExceeded(LedgerError):
    code, title, status = (
        "balance-limit-exceeded",
        "The posting would take a balance beyond the ledger's representable range",
        422,
    )


class OperationNotFound(LedgerError):
    code, title, status = "operation-not-found", "The operation does not exist", 404


class TransactionNotFound(LedgerError):
    code, title, status = "transaction-not-found", "The transaction does not exist", 404


class HoldNotFound(LedgerError):
    code, title, status = "hold-not-found", "The hold does not exist", 404


class HoldExists(LedgerError):
    code, title, status = "hold-exists", "A hold with this id already exists", 409


class HoldNotPending(LedgerError):
    """A hold is captured, voided or expired once; nothing happens to it after that."""

    code, title, status = "hold-not-pending", "The hold is no longer pending", 409


class HoldExpired(LedgerError):
    """Past its expiry a hold can no longer be captured; the expiry worker releases it."""

    code, title, status = "hold-expired", "The hold has expired", 409


class CaptureExceedsHold(LedgerError):
    code, title, status = "capture-exceeds-hold", "The capture exceeds the held amount", 422


class AccountHasOpenHolds(LedgerError):
    code, title, status = "account-has-open-holds", "The account has pending holds", 409


class TransactionNotReversible(LedgerError):
    """A reversal cannot be reversed (post the original again instead), and a transaction of more than two
    entries is reversed in full or not at all."""

    code, title, status = "transaction-not-reversible", "The transaction cannot be reversed this way", 422


class ReversalExceedsOriginal(LedgerError):
    """What all reversals of a transaction move, together, is at most what it moved."""

    code, title, status = "reversal-exceeds-original", "The reversal exceeds what is left to reverse", 422


# --- webhooks ---------------------------------------------------------------------------------------------
class WebhookUrlInvalid(LedgerError):
    code, title, status = "webhook-url-invalid", "The webhook url is not an acceptable http(s) url", 422


class WebhookUrlForbidden(LedgerError):
    code, title, status = (
        "webhook-url-forbidden",
        "The webhook url points at an address that may not receive webhooks",
        422,
    )


class WebhookEndpointNotFound(LedgerError):
    code, title, status = "webhook-endpoint-not-found", "The webhook endpoint does not exist", 404


class WebhookDeliveryNotFound(LedgerError):
    code, title, status = "webhook-delivery-not-found", "The webhook delivery does not exist", 404


class WebhookDeliveryPending(LedgerError):
    code, title, status = (
        "webhook-delivery-pending",
        "The webhook delivery is still being attempted; only a finished one can be sent again",
        409,
    )


# --- transport and infrastructure -------------------------------------------------------------------------
class Unauthorized(LedgerError):
    code, title, status = "unauthorized", "A valid API key is required", 401


class NotFound(LedgerError):
    code, title, status = "not-found", "The resource does not exist", 404


class MethodNotAllowed(LedgerError):
    code, title, status = "method-not-allowed", "The method is not allowed on this resource", 405


class PayloadTooLarge(LedgerError):
    code, title, status = "payload-too-large", "The request body is too large", 413


class RequestTimeout(LedgerError):
    code, title, status = "request-timeout", "The request body did not arrive in time", 408
    permanent = False


class UnsupportedMediaType(LedgerError):
    code, title, status = "unsupported-media-type", "The request body must be application/json", 415


class RateLimited(LedgerError):
    code, title, status = "rate-limited", "Too many requests", 429
    permanent = False


class ServiceUnavailable(LedgerError):
    code, title, status = "service-unavailable", "The service cannot accept the request right now", 503
    permanent = False


class TransientConflict(LedgerError):
    """A concurrent transaction won (serialization failure, deadlock): run the whole unit again."""

    code, title, status = "transient-conflict", "A concurrent update interfered; retry", 503
    permanent = False


class ProcessingFailed(LedgerError):
    code, title, status = "processing-failed", "The operation could not be processed", 500


def catalogue() -> dict[str, type[LedgerError]]:
    """Every released code and its class, for documentation and decoding stored results."""
    found: dict[str, type[LedgerError]] = {}
    stack: list[type[LedgerError]] = [LedgerError]
    while stack:
        cls = stack.pop()
        found[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return found
