"""Outcomes and their JSON shapes: what a client, a poller or a replay sees. One place for the shapes."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any
from uuid import UUID

from core.application.webhooks import StoredEvent, WebhookDelivery, WebhookEndpoint
from core.domain.errors import LedgerError
from core.domain.model import Account, Hold, Transaction


class OperationStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class OperationResult:
    """The settled (or not yet settled) outcome of one command, as stored against its idempotency key."""

    operation_id: UUID
    status: OperationStatus
    result: dict[str, Any] | None = None
    problem: dict[str, Any] | None = None
    replayed: bool = False  # True when answered from the stored result instead of executing

    @classmethod
    def succeeded(cls, operation_id: UUID, result: dict[str, Any]) -> OperationResult:
        return cls(operation_id, OperationStatus.SUCCEEDED, result=result)

    @classmethod
    def failed(cls, operation_id: UUID, error: LedgerError) -> OperationResult:
        return cls(operation_id, OperationStatus.FAILED, problem=error.to_problem())

    @property
    def settled(self) -> bool:
        return self.status is not OperationStatus.PENDING

    def outcome_json(self) -> dict[str, Any] | None:
        """The stored outcome: exactly one of result/problem, or None while pending."""
        if self.status is OperationStatus.SUCCEEDED:
            return {"result": self.result}
        if self.status is OperationStatus.FAILED:
            return {"problem": self.problem}
        return None


def operation_path(operation_id: UUID | str) -> str:
    return f"/v1/operations/{operation_id}"


def operation_json(outcome: OperationResult) -> dict[str, Any]:
    """The polling resource: GET /v1/operations/{id}, 202 bodies, replays and the Redis result cache."""
    body: dict[str, Any] = {"id": str(outcome.operation_id), "object": "operation", "status": str(outcome.status)}
    if outcome.result is not None:
        body["result"] = outcome.result
    if outcome.problem is not None:
        body["problem"] = outcome.problem
    body["links"] = {"self": operation_path(outcome.operation_id)}
    return body


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else _isoformat(ts, ts.tzinfo)


@functools.lru_cache(maxsize=256)
def _isoformat(ts: datetime, tz: tzinfo | None) -> str:
    """Remembered: every transaction of a group shares one time, and a batch writes it 1,000 times. The zone is
    part of the key because two equal instants in different zones are written differently."""
    return ts.isoformat()


def account_json(account: Account) -> dict[str, Any]:
    return {
        "id": str(account.id),
        "currency": account.currency,
        "kind": str(account.kind),
        "status": str(account.status),
        "balance": {
            "posted": account.balance,
            "pending_debits": account.pending_debits,  # held from it by pending holds
            "pending_credits": account.pending_credits,  # held toward it by pending holds
            "available": account.available,  # posted minus pending debits: what the overdraft rule applies to
        },
        "overdraft_limit": account.overdraft.limit,
        "debits_must_not_exceed_credits": account.overdraft.debits_must_not_exceed_credits,
        "version": account.version,
        "metadata": account.metadata,
        "created_at": iso(account.created_at),
    }


def hold_json(hold: Hold) -> dict[str, Any]:
    return {
        "id": str(hold.id),
        "object": "hold",
        "source_id": str(hold.source_id),
        "destination_id": str(hold.destination_id),
        "amount": hold.amount,
        "currency": hold.currency,
        "status": str(hold.status),
        "expires_at": iso(hold.expires_at),
        "captured_amount": hold.captured_amount,
        "capture_transaction_id": None if hold.capture_transaction_id is None else str(hold.capture_transaction_id),
        "metadata": hold.metadata,
        "created_at": iso(hold.created_at),
    }


def transaction_json(tx: Transaction) -> dict[str, Any]:
    return {
        "id": str(tx.id),
        "kind": str(tx.kind),
        "reverses": None if tx.reverses is None else str(tx.reverses),
        "created_at": iso(tx.created_at),
        "metadata": dict(tx.metadata),
        "entries": [
            {
                "account_id": str(e.account_id),
                "amount": e.amount,
                "currency": e.currency,
                "sequence": e.sequence,
                "balance_after": e.balance_after,
            }
            for e in tx.entries
        ],
    }


def endpoint_json(endpoint: WebhookEndpoint, *, secret: str | None = None) -> dict[str, Any]:
    """A webhook endpoint. The signing secret appears only in the answers that create or roll it."""
    body: dict[str, Any] = {
        "id": str(endpoint.id),
        "object": "webhook_endpoint",
        "url": endpoint.url,
        "event_types": list(endpoint.event_types),
        "description": endpoint.description,
        "created_at": iso(endpoint.created_at),
        "secret_rolled_at": iso(endpoint.secret_rolled_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "object": "webhook_delivery",
        "endpoint_id": str(delivery.endpoint_id),
        "event_id": str(delivery.event_id),
        "event_type": delivery.event_type,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at),
        "expires_at": iso(delivery.expires_at),
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "created_at": iso(delivery.created_at),
        "completed_at": iso(delivery.completed_at),
        "attempt_history": [
            {
                "attempt": a.attempt,
                "attempted_at": iso(a.attempted_at),
                "status_code": a.status_code,
                "latency_ms": a.latency_ms,
                "error": a.error,
            }
            for a in delivery.history
        ],
    }


def event_json(event: StoredEvent) -> dict[str, Any]:
    """An event as `GET /v1/events` lists it: the same document a webhook delivery carries."""
    return {
        "id": str(event.id),
        "type": event.type,
        "tenant_id": event.tenant_id,
        "occurred_at": iso(event.occurred_at),
        "data": event.data,
    }
