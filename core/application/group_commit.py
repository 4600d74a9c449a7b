"""Group commit that one bad command cannot poison.

A group settles in one unit of work, and a serialization failure re-runs the whole group (`RetryPolicy`). A
group that fails for any other reason (a bug or a constraint tripped by one command, conflicts that outlast
the retries) is split in halves and each half settled on its own, down to single commands: the failing one
ends `Unsettled` and the others commit. A database that cannot be reached is nobody's fault and is never
split: `StoreUnavailable` reaches the caller, which waits and offers the same group again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from core.application.ports import StoreUnavailable, Submission, UnitOfWork
from core.application.retry import RetryPolicy
from core.application.settle import Clock, Settled, settle, utc_now

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Unsettled:
    """A command that failed on its own for a reason other than a business rule; nothing of it was committed.
    The caller retries it later or, once its retries ran out, gives up on it."""

    error: Exception


Outcome = Settled | Unsettled


def settle_group(
    submissions: Sequence[Submission],
    *,
    uow_factory: Callable[[], UnitOfWork],
    retry: RetryPolicy,
    clock: Clock = utc_now,
) -> list[Outcome]:
    """Settle `submissions` with as few commits as their failures allow; answers in their order."""
    if not submissions:
        return []
    try:
        answers: list[Outcome] = list(
            retry.run(lambda: settle(submissions, uow=uow_factory(), clock=clock), what="group")
        )
        return answers
    except StoreUnavailable:
        raise
    except Exception as exc:
        if len(submissions) == 1:
            log.warning(
                "group.command_failed",
                operation_id=str(submissions[0].operation_id),
                error=f"{type(exc).__name__}: {exc}",
            )
            return [Unsettled(exc)]
        log.warning("group.split", size=len(submissions), error=f"{type(exc).__name__}: {exc}")
        half = len(submissions) // 2
        return [
            *settle_group(submissions[:half], uow_factory=uow_factory, retry=retry, clock=clock),
            *settle_group(submissions[half:], uow_factory=uow_factory, retry=retry, clock=clock),
        ]
