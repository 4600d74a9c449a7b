"""Use cases of one command: run it (a group of one, see `settle`), give up on one whose retries ran out.
(Accepting a command at the ingress is `accept.Acceptance`.)
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from core.application.commands import Command
from core.application.ports import Claim, Completion, Submission, UnitOfWork
from core.application.retry import RetryPolicy
from core.application.settle import Clock, Operation, rejected_event, settle, utc_now
from core.application.views import OperationResult
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


def give_up(
    command: Command, *, uow: UnitOfWork, idempotency_key: str, operation_id: UUID, error: LedgerError
) -> OperationResult:
    """Settle an operation as failed with `error` after its retries ran out, unless it settled meanwhile."""
    claim = Claim.for_command(command, idempotency_key, operation_id)
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
