"""Replay: re-run the requests recorded in the audit trail, in the ledger's commit order, against an empty ledger,
and check that every operation ends as it did and every balance comes out the same.

The trail holds, for every operation, its request (the command as claimed), its idempotency key and operation
id, and its outcome: `transaction.posted` with the entries and the balances they left, `transaction.rejected`
or `command.rejected` with the problem, `account.created` with the account. Each record carries the outbox
position, the order the ledger committed in; replay settles them in that order, in groups, with the same keys
and operation ids. An account is created under the id it was given then. An operation that ended
`processing-failed` (its retries ran out: nothing of it was committed) is given up on again, not re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from core.application.commands import command_from_json
from core.application.group_commit import Outcome, Unsettled
from core.application.ports import AuditRecord, Submission
from core.application.settle import Clock
from core.application.views import OperationResult
from core.domain.errors import LedgerError, ProcessingFailed

# Records that end an operation, and so carry its request and outcome.
OUTCOME_KINDS = frozenset(
    {
        "account.created",
        "account.status_changed",
        "transaction.posted",
        "transaction.rejected",
        "command.rejected",
        "batch.settled",
        "hold.created",
        "hold.voided",
        "hold.expired",
    }
)
# Operations settled in one group at most while replaying.
GROUP_SIZE = 256


@dataclass(frozen=True, slots=True)
class Recorded:
    """One operation as the trail remembers it."""

    position: int
    tenant_id: str
    occurred_at: datetime  # when its group settled: the clock its time-bound rules (a hold's expiry) read
    submission: Submission
    succeeded: bool
    problem_code: str | None
    entries: tuple[tuple[str, int, int], ...]  # (account id, amount, balance after), as posted


@dataclass
class ReplayReport:
    operations: int = 0
    accounts: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.mismatches


def recorded_operations(records: Iterable[AuditRecord]) -> list[Recorded]:
    """The operations of the trail in commit order; records that end no operation are left out."""
    found: dict[str, Recorded] = {}
    for record in records:
        document = record.document
        tenant_id = record.tenant_id
        if record.kind not in OUTCOME_KINDS or record.position is None or tenant_id is None:
            continue
        if "request" not in document:  # a batch's item: its batch's record holds the request and outcome
            continue
        request: dict[str, Any] = dict(document["request"])
        if record.kind == "account.created":
            request["account_id"] = document["account"]["id"]  # the id it was given, however it was chosen
        if record.kind == "hold.created":
            request["hold_id"] = document["hold"]["id"]
        if record.kind == "batch.settled":
            request["items"] = [
                {**item, "account_id": outcome["result"]["account"]["id"]}
                if item["type"] == "create_account" and outcome["status"] == "succeeded"
                else item
                for item, outcome in zip(request["items"], document["items"], strict=True)
            ]
        problem = document.get("problem")
        entries = posted_entries(document)
        operation_id = str(document["operation_id"])
        found.setdefault(
            operation_id,
            Recorded(
                record.position,
                tenant_id,
                record.occurred_at,
                Submission(command_from_json(request), str(document["idempotency_key"]), UUID(operation_id)),
                problem is None,
                problem.get("code") if isinstance(problem, dict) else None,
                entries,
            ),
        )
    return sorted(found.values(), key=lambda r: r.position)


def replay(
    operations: Sequence[Recorded],
    *,
    settle_group: Callable[[Sequence[Submission], Clock], list[Outcome]],
    give_up: Callable[[Submission, LedgerError], OperationResult],
    balance_of: Callable[[str, UUID], int | None],
) -> ReplayReport:
    """Settle `operations` in order into an empty ledger and compare every outcome and balance with the trail."""
    report = ReplayReport(operations=len(operations))
    start = 0
    while start < len(operations):
        if operations[start].problem_code == ProcessingFailed.code:
            recorded = operations[start]
            _compare(recorded, give_up(recorded.submission, ProcessingFailed("given up, as recorded")), report)
            start += 1
            continue
        # A group is the operations that settled together (one time), so each is replayed at the moment it settled
        # and a hold's expiry decides as it did then.
        end, moment = start, operations[start].occurred_at
        while end < len(operations) and end - start < GROUP_SIZE and operations[end].occurred_at == moment:
            if operations[end].problem_code == ProcessingFailed.code:
                break
            end += 1
        group = operations[start:end]
        outcomes = settle_group([r.submission for r in group], at(moment))
        for recorded, outcome in zip(group, outcomes, strict=True):
            _compare(recorded, outcome, report)
        start = end
    last_balance: dict[tuple[str, str], int] = {}
    for recorded in operations:
        for account_id, _, balance_after in recorded.entries:
            last_balance[(recorded.tenant_id, account_id)] = balance_after
    for (tenant_id, account_id), expected in sorted(last_balance.items()):
        actual = balance_of(tenant_id, UUID(account_id))
        if actual != expected:
            report.mismatches.append(f"account {account_id} ({tenant_id}): balance {actual}, recorded {expected}")
    report.accounts = len(last_balance)
    return report


def at(moment: datetime) -> Clock:
    """A clock stopped at `moment`."""
    return lambda: moment


def _compare(recorded: Recorded, outcome: Outcome, report: ReplayReport) -> None:
    where = f"operation {recorded.submission.operation_id} at position {recorded.position}"
    if isinstance(outcome, Unsettled | LedgerError):
        error = outcome.error if isinstance(outcome, Unsettled) else outcome
        report.mismatches.append(f"{where}: could not be replayed: {type(error).__name__}: {error}")
        return
    code = outcome.problem.get("code") if outcome.problem else None
    if (outcome.problem is None) != recorded.succeeded or code != recorded.problem_code:
        recorded_as = "succeeded" if recorded.succeeded else f"failed {recorded.problem_code}"
        report.mismatches.append(f"{where}: {outcome.status} {code or ''} where the trail says {recorded_as}")
        return
    if recorded.entries and outcome.result is not None:
        replayed = posted_entries(outcome.result)
        if sorted(replayed) != sorted(recorded.entries):
            report.mismatches.append(f"{where}: entries {replayed} where the trail says {recorded.entries}")


def posted_entries(result: dict[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """(account id, amount, balance after) of every entry an outcome posted, a batch's items' included."""
    results = [item.get("result") or {} for item in result["items"]] if "items" in result else [result]
    return tuple(
        (str(e["account_id"]), int(e["amount"]), int(e["balance_after"]))
        for one in results
        for e in one.get("transaction", {}).get("entries", [])
    )
