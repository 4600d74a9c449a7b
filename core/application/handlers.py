"""Use cases of one command: run it (a group of one, see `settle`), accept it at the ingress, abandon an
accepted command that never reached the queue, give up on one whose retries ran out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from uuid import UUID

from core.application.commands import Command
from core.application.ports import Claim, Completion, ExistingKey, UnitOfWork
from core.application.retry import RetryPolicy
from core.application.settle import Clock, Operation, Submission, rejected_event, settle, utc_now
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import IdempotencyKeyReused, LedgerError
from core.domain.ids import new_id


def execute(
    command: Command,
    *,
    uow: UnitOfWork,
    idempotency_key: str,
    operation_id: UUID | None = None,
    clock: Clock = utc_now,
) -> OperationResult:
    """Run one command exactly once per (tenant, idempotency key): a group of one; one attempt, no retries.

    Raises `IdempotencyKeyReused` when the key belongs to a different request, and `TransientConflict`
    when a concurrent transaction won (the caller retries the whole call, see `run`).
    """
    submission = Submission(command, idempotency_key, operation_id or new_id())
    [answer] = settle([submission], uow=uow, clock=clock)
    if isinstance(answer, IdempotencyKeyReused):
        raise answer
    return answer


def accept(command: Command, *, uow: UnitOfWork, idempotency_key: str, operation_id: UUID) -> OperationResult:
    """Ingress phase: record the command as a pending operation under its key, to be settled by a worker.

    When the key is already known, answers its operation instead (pending or settled, `replayed=True`).
    """
    claim = _claim(command, idempotency_key, operation_id)
    with uow:
        existing = uow.idempotency.claim([claim]).get((command.tenant_id, idempotency_key))
        if existing is not None:
            return _known_operation(existing, claim.fingerprint, idempotency_key)
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
    claim = _claim(command, idempotency_key, operation_id)
    with uow:
        existing = uow.idempotency.claim([claim]).get((command.tenant_id, idempotency_key))
        if existing is not None and (existing.operation.settled or existing.operation.operation_id != operation_id):
            return existing.operation
        outcome = OperationResult.failed(operation_id, error)
        operation = Operation(operation_id, idempotency_key, claim.request)
        uow.outbox.stage([rejected_event(command, operation, error, utc_now())])
        uow.idempotency.complete([Completion(command.tenant_id, idempotency_key, outcome)])
        uow.commit()
    return outcome


def _claim(command: Command, idempotency_key: str, operation_id: UUID) -> Claim:
    return Claim(
        command.tenant_id, idempotency_key, command.fingerprint(), operation_id, command.type, command.to_json()
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
