"""The accept phase (Brandur Leach's "recovery points", in the ingress): record, queue, answer, in groups.

The requests that arrive while a group is in flight form the next group (`GroupWriter`), which then costs:
1. one statement and one commit to record its commands as pending operations under their (tenant,
   idempotency key)s; a known key answers its operation instead, or 422 when it belongs to another request;
2. one message holding the new commands, and one publisher confirm (pipelined with other groups');
3. one cache round trip noting them as queued, and each request is answered 202 with its operation.
There is no "mark enqueued" commit: the sweeper treats any operation still pending after its grace period as
possibly unqueued and publishes it again, which a worker settles as a replay at worst.

If the queue does not confirm, the group's new records are withdrawn and their clients get 503: nothing was
accepted, and a retry with the same key starts afresh. (If even the withdrawal fails, the records stay and
will settle through the sweeper, so the clients get their pending operations rather than an untrue 503.) If
the process dies between 1 and 2, no 202 went out and the sweeper queues the recorded commands later; either
way an id that was answered always answers.

A duplicate that finds its key pending while the first request may still be publishing (so the record
could yet be withdrawn) gets the in-flight answer (409, retry shortly) rather than an id that could vanish.
It gets the operation once the queue confirmed it (`QueuedKeys`, a cache) or once the grace period passed
(the first request's publisher is gone by then and the sweeper owns the operation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import structlog

from core.application.commands import Command
from core.application.grouping import GroupWriter
from core.application.ports import (
    Claim,
    CommandQueue,
    ExistingKey,
    OperationRecords,
    QueuedKeys,
    QueueUnavailable,
    StoreUnavailable,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import IdempotencyKeyInUse, IdempotencyKeyReused, ServiceUnavailable, TransientConflict
from core.domain.ids import new_id

log = structlog.get_logger(__name__)

# Seconds after which a pending operation's first request is surely done publishing (its publish timeout and
# bookkeeping are far shorter): past it, a duplicate gets the operation even without the cache's word.
PUBLISH_GRACE_S = 30.0
# Times a group's record statement is re-run after racing a concurrent claim of one of its keys.
RECORD_ATTEMPTS = 5
# What a recorded claim gives: None when the key was claimed now, otherwise the key's existing record.
Recorded = ExistingKey | None


class Acceptance:
    """The accept use case of one ingress process, bound to its ports.

    max_group: most requests in one group (one statement, one message). writers: groups in flight at once.
    retry_after_s: seconds a client is told to wait when the queue cannot take commands.
    """

    def __init__(
        self,
        *,
        records: OperationRecords,
        queue: CommandQueue,
        queued_keys: QueuedKeys,
        max_group: int = 256,
        writers: int = 2,
        retry_after_s: int = 5,
    ) -> None:
        self.records = records
        self.queue = queue
        self.queued_keys = queued_keys
        self.retry_after_s = retry_after_s
        self._writer: GroupWriter[Claim, Recorded] = GroupWriter(
            self._accept_group, max_group=max_group, writers=writers
        )

    async def accept(self, command: Command, *, idempotency_key: str) -> OperationResult:
        """Accept a command for a worker: its pending operation (new), or the key's operation (`replayed`)."""
        claim = Claim.for_command(command, idempotency_key, new_id())
        existing = await self._writer.submit(claim)
        if existing is not None:
            return await self._known(claim, existing)
        return OperationResult(claim.operation_id, OperationStatus.PENDING)

    async def _accept_group(self, claims: Sequence[Claim]) -> list[Recorded | BaseException]:
        """Record a group's claims (one statement), queue the new ones (one message, one confirm), note them
        as queued (one cache round trip): a request's share of each is a fraction."""
        recorded = await self._record(claims)
        new = [claim for claim, answer in zip(claims, recorded, strict=True) if answer is None]
        if not new:
            return recorded
        try:
            await self.queue.publish(new)
        except QueueUnavailable as exc:
            if not await self._withdrawn(new):
                # The records stay, so the operations will settle: the sweeper queues them once overdue.
                return recorded
            refused = ServiceUnavailable(
                "the command queue is unreachable; nothing was accepted, retry later with the same Idempotency-Key",
                retry_after=self.retry_after_s,
                reason=str(exc),
            )
            return [refused if answer is None else answer for answer in recorded]
        await self.queued_keys.remember(new)
        return recorded

    async def close(self) -> None:
        await self._writer.close()

    async def _known(self, claim: Claim, existing: ExistingKey) -> OperationResult:
        if existing.fingerprint != claim.fingerprint:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {claim.key!r} was used for a different request",
                operation_id=str(existing.operation.operation_id),
            )
        operation = existing.operation
        if not operation.settled and existing.age_s < PUBLISH_GRACE_S:
            queued = await self.queued_keys.queued_operation(claim.tenant_id, claim.key)
            if queued != operation.operation_id:
                raise IdempotencyKeyInUse(
                    f"the first request with Idempotency-Key {claim.key!r} is still being accepted", retry_after=1
                )
        return replace(operation, replayed=True)

    async def _withdrawn(self, claims: list[Claim]) -> bool:
        try:
            await self.records.withdraw(claims)
        except (StoreUnavailable, TransientConflict) as exc:
            log.warning("accept.withdraw_failed", operations=len(claims), error=str(exc))
            return False
        return True

    async def _record(self, claims: Sequence[Claim]) -> list[Recorded | BaseException]:
        """One group's records: one statement for its distinct keys. A key twice in the group is, for the
        later request, a duplicate of the earlier one, still publishing."""
        first: dict[tuple[str, str], Claim] = {}
        for claim in claims:
            first.setdefault((claim.tenant_id, claim.key), claim)
        distinct = list(first.values())
        try:
            existing = await self._record_distinct(distinct)
        except (StoreUnavailable, TransientConflict):
            raise  # the same for every claim: the writer hands it to each caller
        except Exception:
            if len(distinct) == 1:
                raise
            # One claim the store refuses must not fail its neighbours: each alone, so only it fails.
            return [await self._record_alone(claim) for claim in claims]
        answers: list[Recorded | BaseException] = []
        for claim in claims:
            earlier = first[(claim.tenant_id, claim.key)]
            if earlier is claim:
                answers.append(existing.get((claim.tenant_id, claim.key)))
            else:
                answers.append(existing.get((claim.tenant_id, claim.key)) or _in_flight(earlier))
        return answers

    async def _record_alone(self, claim: Claim) -> Recorded | BaseException:
        try:
            [answer] = await self._record([claim])
        except Exception as exc:
            return exc
        return answer

    async def _record_distinct(self, claims: list[Claim]) -> dict[tuple[str, str], ExistingKey]:
        for _ in range(RECORD_ATTEMPTS - 1):
            try:
                return await self.records.record(claims)
            except TransientConflict:
                continue  # a concurrent claim of one of the keys rolled back while we waited: read again
        return await self.records.record(claims)


def _in_flight(claim: Claim) -> ExistingKey:
    return ExistingKey(claim.fingerprint, OperationResult(claim.operation_id, OperationStatus.PENDING), age_s=0.0)
