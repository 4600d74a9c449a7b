"""Use cases. Each runs as one unit of work: claim the idempotency key, do the work, store the outcome and
stage its events, commit. Business rejections are committed as the operation's final, replayable result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from uuid import UUID

import structlog

from core.application.commands import (
    ChangeAccountStatus,
    Command,
    CreateAccount,
    Credit,
    Debit,
    PostingCommand,
    Transfer,
)
from core.application.ports import Event, ExistingKey, UnitOfWork
from core.application.retry import RetryPolicy
from core.application.views import OperationResult, OperationStatus, account_json, transaction_json
from core.domain.errors import (
    AccountExists,
    AccountNotFound,
    CurrencyMismatch,
    IdempotencyKeyReused,
    LedgerError,
)
from core.domain.ids import external_account_id, new_id
from core.domain.model import Account, AccountKind, TransactionKind, post_legs

Clock = Callable[[], datetime]
log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


def execute(
    command: Command,
    *,
    uow: UnitOfWork,
    idempotency_key: str,
    operation_id: UUID | None = None,
    clock: Clock = utc_now,
) -> OperationResult:
    """Run one command exactly once per (tenant, idempotency key); one attempt, no retries.

    Raises `IdempotencyKeyReused` when the key belongs to a different request, and `TransientConflict`
    when a concurrent transaction won (the caller retries the whole call, see `run`).
    """
    fingerprint = command.fingerprint()
    op_id = operation_id or new_id()
    with uow.writing(command.tenant_id, _written_accounts(command)):
        existing = uow.idempotency.claim(command, key=idempotency_key, fingerprint=fingerprint, operation_id=op_id)
        if existing is not None:
            known = _known_operation(existing, fingerprint, idempotency_key)
            if known.settled:
                return known
            # Claimed but pending: the ingress recorded the key and queued us. Settle that operation.
            op_id = known.operation_id
        outcome = _settle(command, uow, op_id, clock())
        uow.idempotency.complete(command.tenant_id, idempotency_key, outcome)
        uow.commit()
    return outcome


def accept(command: Command, *, uow: UnitOfWork, idempotency_key: str, operation_id: UUID) -> OperationResult:
    """Ingress phase: record the command as a pending operation under its key, to be settled by a worker.

    When the key is already known, answers its operation instead (pending or settled, `replayed=True`).
    """
    fingerprint = command.fingerprint()
    with uow:
        existing = uow.idempotency.claim(
            command, key=idempotency_key, fingerprint=fingerprint, operation_id=operation_id
        )
        if existing is not None:
            return _known_operation(existing, fingerprint, idempotency_key)
        uow.commit()
    return OperationResult(operation_id, OperationStatus.PENDING)


def abandon(tenant_id: str, *, uow: UnitOfWork, idempotency_key: str, operation_id: UUID) -> None:
    """Undo `accept` when the command could not be queued, so nothing stays half-accepted. A no-op once a
    worker settled the operation (the broker took the command after all)."""
    with uow:
        uow.idempotency.release(tenant_id, idempotency_key, operation_id)
        uow.commit()


def give_up(
    command: Command, *, uow: UnitOfWork, idempotency_key: str, operation_id: UUID, error: LedgerError
) -> OperationResult:
    """Settle an operation as failed with `error` after its retries ran out, unless it settled meanwhile."""
    fingerprint = command.fingerprint()
    with uow:
        existing = uow.idempotency.claim(
            command, key=idempotency_key, fingerprint=fingerprint, operation_id=operation_id
        )
        if existing is not None and (existing.operation.settled or existing.operation.operation_id != operation_id):
            return existing.operation
        outcome = OperationResult.failed(operation_id, error)
        uow.outbox.stage(_rejected_event(command, operation_id, error, utc_now()))
        uow.idempotency.complete(command.tenant_id, idempotency_key, outcome)
        uow.commit()
    return outcome


def _rejected_event(command: Command, operation_id: UUID, error: LedgerError, now: datetime) -> Event:
    return Event(
        "transaction.rejected" if isinstance(command, Credit | Debit | Transfer) else "command.rejected",
        command.tenant_id,
        {"operation_id": str(operation_id), "command": command.to_json(), "problem": error.to_problem()},
        now,
    )


def _known_operation(existing: ExistingKey, fingerprint: str, idempotency_key: str) -> OperationResult:
    if existing.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {idempotency_key!r} was used for a different request",
            operation_id=str(existing.operation.operation_id),
        )
    return replace(existing.operation, replayed=True)


def run(
    command: Command,
    *,
    uow_factory: Callable[[], UnitOfWork],
    idempotency_key: str,
    operation_id: UUID | None = None,
    retry: RetryPolicy | None = None,
    clock: Clock = utc_now,
) -> OperationResult:
    """`execute` with retries on serialization failures and deadlocks, each attempt a fresh unit of work."""
    op_id = operation_id or new_id()  # fixed across attempts so the operation keeps one id
    policy = retry or RetryPolicy()
    return policy.run(
        lambda: execute(command, uow=uow_factory(), idempotency_key=idempotency_key, operation_id=op_id, clock=clock),
        what=command.type,
    )


def _settle(command: Command, uow: UnitOfWork, operation_id: UUID, now: datetime) -> OperationResult:
    try:
        if isinstance(command, CreateAccount):
            result = _create_account(command, uow, now)
        elif isinstance(command, Credit | Debit | Transfer):
            result = _post(command, uow, operation_id, now)
        elif isinstance(command, ChangeAccountStatus):
            result = _change_status(command, uow, now)
        else:  # pragma: no cover - exhaustive over COMMAND_TYPES
            raise TypeError(f"no handler for {type(command).__name__}")
    except LedgerError as error:
        if not error.permanent:
            raise
        log.info("operation.rejected", operation_id=str(operation_id), code=error.code)
        uow.outbox.stage(_rejected_event(command, operation_id, error, now))
        return OperationResult.failed(operation_id, error)
    return OperationResult.succeeded(operation_id, result)


def _create_account(command: CreateAccount, uow: UnitOfWork, now: datetime) -> dict[str, object]:
    account = Account(
        id=command.account_id or new_id(),
        tenant_id=command.tenant_id,
        currency=command.currency,
        kind=AccountKind.CUSTOMER,
        overdraft=command.overdraft,
        metadata=command.metadata,
        created_at=now,
    )
    if not uow.accounts.add(account):
        raise AccountExists(f"account {account.id} already exists", account_id=str(account.id))
    body = account_json(account)
    uow.outbox.stage(Event("account.created", command.tenant_id, {"account": body}, now))
    return {"account": body}


def _change_status(command: ChangeAccountStatus, uow: UnitOfWork, now: datetime) -> dict[str, object]:
    account = uow.accounts.lock(command.tenant_id, [command.account_id]).get(command.account_id)
    if account is None or account.kind is not AccountKind.CUSTOMER:
        raise AccountNotFound(f"account {command.account_id} does not exist", account_id=str(command.account_id))
    account.change_status(command.status)
    uow.accounts.save_status(account)
    body = account_json(account)
    uow.outbox.stage(Event("account.status_changed", command.tenant_id, {"account": body}, now))
    return {"account": body}


def _written_accounts(command: Command) -> list[UUID]:
    """The accounts a command may lock and write, known before it runs."""
    if isinstance(command, Credit | Debit | Transfer):
        return [account_id for account_id, _ in _legs(command, command.tenant_id)[1]]
    if isinstance(command, ChangeAccountStatus):
        return [command.account_id]
    return []


def _legs(command: PostingCommand, tenant_id: str) -> tuple[TransactionKind, list[tuple[UUID, int]]]:
    """Signed legs (credit > 0, debit < 0) of a command; they always sum to zero."""
    amount = command.amount.amount
    if isinstance(command, Credit):
        external = external_account_id(tenant_id, command.amount.currency)
        return TransactionKind.CREDIT, [(external, -amount), (command.account_id, amount)]
    if isinstance(command, Debit):
        external = external_account_id(tenant_id, command.amount.currency)
        return TransactionKind.DEBIT, [(command.account_id, -amount), (external, amount)]
    return TransactionKind.TRANSFER, [(command.source_id, -amount), (command.destination_id, amount)]


def _post(command: PostingCommand, uow: UnitOfWork, operation_id: UUID, now: datetime) -> dict[str, object]:
    tenant = command.tenant_id
    kind, legs = _legs(command, tenant)
    ids = [account_id for account_id, _ in legs]
    accounts = uow.accounts.lock(tenant, ids)
    # Only credits and debits may touch a system account, and only the external one they name.
    external = None if isinstance(command, Transfer) else external_account_id(tenant, command.amount.currency)
    if external is not None and external not in accounts:
        uow.accounts.ensure_external(tenant, command.amount.currency)  # first posting in this currency
        accounts |= uow.accounts.lock(tenant, [external])
    for account_id in ids:
        account = accounts.get(account_id)
        if account is None or (account.kind is AccountKind.SYSTEM and account_id != external):
            raise AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))
        if account.currency != command.amount.currency:
            raise CurrencyMismatch(
                f"account {account_id} holds {account.currency}, not {command.amount.currency}",
                account_id=str(account_id),
            )
    transaction = post_legs(
        transaction_id=new_id(),
        tenant_id=tenant,
        kind=kind,
        legs=[(accounts[account_id], amount) for account_id, amount in legs],
        metadata=command.metadata,
        created_at=now,
    )
    touched = [accounts[account_id] for account_id in ids]
    uow.ledger.append(transaction, touched, operation_id=operation_id)
    body = transaction_json(transaction)
    result: dict[str, object] = {
        "transaction": body,
        "accounts": [account_json(a) for a in touched if a.kind is AccountKind.CUSTOMER],
    }
    uow.outbox.stage(Event("transaction.posted", tenant, {"operation_id": str(operation_id), "transaction": body}, now))
    return result
