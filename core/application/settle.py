"""Settling commands in groups: one unit of work, one commit, many commands (group commit).

`settle` locks every account the group may write once, in id order, claims all the group's idempotency keys
in one statement, then applies the domain rules to each command in order, in memory, each seeing the state
the earlier ones left. A business rejection is that command's final result and leaves the others alone. The
writes go out as one statement per kind of row: postings and the balances they change in chunks while the
group settles (`POSTINGS_PER_STATEMENT`), new accounts, outcomes and events at its end; the unit commits
once. A group of one is the synchronous path; the workers hand it up to hundreds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog

from core.application.commands import (
    Batch,
    CaptureHold,
    ChangeAccountStatus,
    Command,
    CreateAccount,
    CreateHold,
    Credit,
    Debit,
    ExpireHold,
    HoldCommand,
    PostingCommand,
    PostTransaction,
    ReverseTransaction,
    UpdateAccountMetadata,
    VoidHold,
)
from core.application.ports import (
    Claim,
    Completion,
    Event,
    HoldKey,
    PlacedHold,
    Posting,
    Submission,
    TransactionKey,
    UnitOfWork,
)
from core.application.views import OperationResult, account_json, hold_json, transaction_json
from core.domain.errors import (
    AccountExists,
    AccountNotFound,
    CurrencyMismatch,
    HoldExists,
    HoldExpired,
    HoldNotFound,
    IdempotencyKeyReused,
    LedgerError,
    TransactionNotFound,
    TransientConflict,
    ValidationFailed,
)
from core.domain.ids import external_account_id, new_id
from core.domain.model import (
    Account,
    AccountKey,
    AccountKind,
    Hold,
    HoldStatus,
    OverdraftPolicy,
    Transaction,
    TransactionKind,
    place_hold,
    post_legs,
    reversal_legs,
)

Clock = Callable[[], datetime]
log = structlog.get_logger(__name__)

# Postings go to the ledger this many at a time while the group goes on, with the balances they changed, not
# all at its end: the unit's pipeline does not wait for a statement's answer, so PostgreSQL writes one chunk's
# transactions, entries and balances while the worker settles the next, and a batch of 1,000 holds its
# accounts' locks for little more than the worker's part (bench/batches.py). An account that a later chunk
# changes again is saved again: a second row version, for the few accounts two chunks share.
POSTINGS_PER_STATEMENT = 200


def utc_now() -> datetime:
    return datetime.now(UTC)


# What settling a submission gives: its operation's outcome, or the error that makes the request itself
# unacceptable (its key belongs to a different request); only the first is stored.
Settled = OperationResult | IdempotencyKeyReused


def settle(submissions: Sequence[Submission], *, uow: UnitOfWork, clock: Clock = utc_now) -> list[Settled]:
    """Settle each submission exactly once per (tenant, key), in one unit of work; one attempt, no retries.

    Answers in the submissions' order. A key that is already settled replays its outcome (`replayed=True`);
    a key sent twice in one group settles once and answers both alike. Raises `TransientConflict` when a
    concurrent transaction won (the caller runs the whole group again).
    """
    fingerprints: list[str] = []
    bodies: list[dict[str, Any]] = []
    claims: dict[tuple[str, str], Claim] = {}
    for submission in submissions:
        command, key = submission.command, submission.idempotency_key
        body = submission.request if submission.request is not None else command.to_json()
        bodies.append(body)
        fingerprints.append(command.fingerprint(body))
        if (command.tenant_id, key) not in claims:
            claims[(command.tenant_id, key)] = Claim(
                command.tenant_id, key, fingerprints[-1], submission.operation_id, command.type, body
            )
    commands = [s.command for s in submissions]
    reversed_keys = {
        (c.tenant_id, c.transaction_id) for c in each_command(commands) if isinstance(c, ReverseTransaction)
    }
    originals = uow.find_transactions(reversed_keys) if reversed_keys else {}
    named_holds = {(c.tenant_id, c.hold_id) for c in commands if isinstance(c, HoldCommand)}
    holds = uow.find_holds(named_holds) if named_holds else {}
    chosen_holds = {(c.tenant_id, c.hold_id) for c in commands if isinstance(c, CreateHold) and c.hold_id}
    with uow.writing(written_accounts(commands, originals, holds)):
        # Each key's record as the group goes: (fingerprint, outcome) once known or settled here.
        records = {k: (e.fingerprint, e.operation) for k, e in uow.idempotency.claim(list(claims.values())).items()}
        books = _Books(uow.accounts.lock(uow.write_set.accounts) if uow.write_set else {}, clock(), uow=uow)
        if originals:
            books.originals = originals
            books.reversed = uow.ledger.reversed_amounts(list(originals))
        if named_holds or chosen_holds:
            books.holds = uow.holds.lock(named_holds | chosen_holds)  # their status as it stands, locked
        answers: list[Settled] = []
        completions: list[Completion] = []
        for submission, fingerprint, body in zip(submissions, fingerprints, bodies, strict=True):
            command, key = submission.command, submission.idempotency_key
            record = records.get((command.tenant_id, key))
            if record is not None and record[0] != fingerprint:
                answers.append(
                    IdempotencyKeyReused(
                        f"Idempotency-Key {key!r} was used for a different request",
                        operation_id=str(record[1].operation_id),
                    )
                )
                continue
            if record is not None and record[1].settled:
                answers.append(replace(record[1], replayed=True))
                continue
            # Claimed now, or claimed but pending (the ingress recorded the key and queued us): settle it.
            claimed = record[1] if record is not None else claims[(command.tenant_id, key)]
            outcome = books.settle(command, Operation(claimed.operation_id, key, body))
            records[(command.tenant_id, key)] = (fingerprint, outcome)
            completions.append(Completion(command.tenant_id, key, outcome))
            answers.append(outcome)
        if completions:
            books.write()
            uow.idempotency.complete(completions)
            uow.commit()
    return answers


def each_command(commands: Iterable[Command]) -> Iterable[Command]:
    """The commands, a batch's items in its place."""
    for command in commands:
        if isinstance(command, Batch):
            yield from command.items
        else:
            yield command


def written_accounts(
    commands: Iterable[Command],
    originals: Mapping[TransactionKey, Transaction] | None = None,
    holds: Mapping[HoldKey, Hold] | None = None,
) -> set[AccountKey]:
    """The accounts commands may lock and write (a client-chosen new id included), known before they run; a
    reversal writes the accounts of its original, a hold's capture, void or expiry those of the hold."""
    keys: set[AccountKey] = set()
    for command in each_command(commands):
        if isinstance(command, CreateHold):
            keys.update((command.tenant_id, account_id) for account_id in (command.source_id, command.destination_id))
        elif isinstance(command, HoldCommand):
            hold = (holds or {}).get((command.tenant_id, command.hold_id))
            if hold is not None:
                keys.update((command.tenant_id, account_id) for account_id in (hold.source_id, hold.destination_id))
        elif isinstance(command, ReverseTransaction):
            original = (originals or {}).get((command.tenant_id, command.transaction_id))
            if original is not None:
                keys.update((command.tenant_id, e.account_id) for e in original.entries)
        elif isinstance(command, PostingCommand):
            keys.update((command.tenant_id, account_id) for account_id, _, _ in legs_of(command)[1])
        elif isinstance(command, ChangeAccountStatus | UpdateAccountMetadata | CreateAccount) and command.account_id:
            keys.add((command.tenant_id, command.account_id))
    return keys


def legs_of(command: PostingCommand) -> tuple[TransactionKind, list[tuple[UUID, int, str]]]:
    """Signed legs (account, credit > 0 or debit < 0, currency) of a command; they sum to zero per currency."""
    if isinstance(command, PostTransaction):
        return TransactionKind.MULTI_LEG, [(leg.account_id, leg.amount, leg.currency) for leg in command.legs]
    amount, currency = command.amount.amount, command.amount.currency
    if isinstance(command, Credit):
        external = external_account_id(command.tenant_id, currency)
        return TransactionKind.CREDIT, [(external, -amount, currency), (command.account_id, amount, currency)]
    if isinstance(command, Debit):
        external = external_account_id(command.tenant_id, currency)
        return TransactionKind.DEBIT, [(command.account_id, -amount, currency), (external, amount, currency)]
    return TransactionKind.TRANSFER, [
        (command.source_id, -amount, currency),
        (command.destination_id, amount, currency),
    ]


@dataclass(frozen=True, slots=True)
class Operation:
    """What every event of an operation carries, so the audit trail links it to its request."""

    id: UUID
    idempotency_key: str
    request: dict[str, Any]  # the command's JSON form, as claimed
    batch_item: int | None = None  # an item of a batch: its index there

    def event(self, event_type: str, tenant_id: str, payload: dict[str, Any], now: datetime) -> Event:
        context = {"operation_id": str(self.id), "idempotency_key": self.idempotency_key, "request": self.request}
        return Event(event_type, tenant_id, {**context, **payload}, now)

    def item(self, index: int) -> Operation:
        return Operation(self.id, self.idempotency_key, self.request, index)


def rejected_event(command: Command, operation: Operation, error: LedgerError, now: datetime) -> Event:
    kind = "transaction.rejected" if isinstance(command, PostingCommand) else "command.rejected"
    return operation.event(kind, command.tenant_id, {"problem": error.to_problem()}, now)


class _Books:
    """A group's view of the ledger while it settles: the locked accounts, changed in memory, and everything
    to write, sent to the unit as the group goes (postings and balances) or once it is done (the rest)."""

    def __init__(self, locked: dict[AccountKey, Account], now: datetime, *, uow: UnitOfWork) -> None:
        self.accounts = locked  # by (tenant, id): a group may serve many tenants
        self.now = now
        self.uow = uow
        self.created: dict[AccountKey, Account] = {}  # inserted at the end as they then stand
        # Not yet sent to the unit (see POSTINGS_PER_STATEMENT): postings, existing accounts whose balance,
        # status or metadata changed, and those among them whose status or metadata did.
        self.postings: list[Posting] = []
        self.changed: dict[AccountKey, Account] = {}
        self.restated: set[AccountKey] = set()
        self.events: list[Event] = []
        self.originals: Mapping[TransactionKey, Transaction] = {}  # the transactions the group reverses
        self.reversed: dict[TransactionKey, int] = {}  # what their reversals moved so far, this group's included
        self.holds: dict[HoldKey, Hold] = {}  # the holds the group names, locked, and those it places
        self.placed: list[PlacedHold] = []
        self.changed_holds: dict[HoldKey, Hold] = {}  # existing holds whose status changed

    def settle(self, command: Command, operation: Operation) -> OperationResult:
        operation_id = operation.id
        try:
            if isinstance(command, Batch):
                result = self._batch(command, operation)
            elif isinstance(command, CreateAccount):
                result = self._create_account(command, operation)
            elif isinstance(command, PostingCommand):
                result = self._post(command, operation)
            elif isinstance(command, ReverseTransaction):
                result = self._reverse(command, operation)
            elif isinstance(command, CreateHold):
                result = self._place_hold(command, operation)
            elif isinstance(command, CaptureHold):
                result = self._capture_hold(command, operation)
            elif isinstance(command, VoidHold | ExpireHold):
                result = self._release_hold(command, operation)
            elif isinstance(command, ChangeAccountStatus):
                result = self._change_status(command, operation)
            elif isinstance(command, UpdateAccountMetadata):
                result = self._patch_metadata(command, operation)
            else:  # pragma: no cover - exhaustive over COMMAND_TYPES
                raise TypeError(f"no handler for {type(command).__name__}")
        except LedgerError as error:
            if not error.permanent:
                raise
            log.info("operation.rejected", operation_id=str(operation_id), code=error.code)
            self._stage(operation, rejected_event(command, operation, error, self.now))
            return OperationResult.failed(operation_id, error)
        return OperationResult.succeeded(operation_id, result)

    def write(self) -> None:
        """Everything the group changed and did not send yet, one statement per kind of row."""
        uow = self.uow
        if self.created:
            uow.accounts.add(list(self.created.values()))
        self._send_postings()
        if self.placed:
            uow.holds.add(self.placed)
        if self.changed_holds:
            uow.holds.save(list(self.changed_holds.values()))
        if self.events:
            uow.outbox.stage(self.events)

    def _account(self, tenant_id: str, account_id: UUID) -> Account | None:
        return self.accounts.get((tenant_id, account_id))

    def _open(self, account: Account) -> Account:
        self.accounts[account.key] = self.created[account.key] = account
        return account

    def _touch(self, account: Account) -> None:
        if account.key not in self.created:
            self.changed[account.key] = account

    def _leg_account(self, tenant: str, account_id: UUID, currency: str, external: UUID | None) -> Account:
        account = self._account(tenant, account_id)
        if account is None and account_id == external:
            # The tenant's first posting in this currency: its id was locked with the others.
            unrestricted = OverdraftPolicy(None)
            account = self._open(
                Account(account_id, tenant, currency, AccountKind.SYSTEM, unrestricted, created_at=self.now)
            )
        if account is None or (account.kind is AccountKind.SYSTEM and account_id != external):
            raise AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))
        if account.currency != currency:
            raise CurrencyMismatch(
                f"account {account_id} holds {account.currency}, not {currency}", account_id=str(account_id)
            )
        return account

    def _batch(self, command: Batch, operation: Operation) -> dict[str, object]:
        """Each item on its own, in order: one refused leaves the others as they would be without it.

        A batch stages one event, `batch.settled`, its snapshot: the request and every item's outcome. An item
        stages none of its own, so 1,000 transfers cost one outbox row, one message and one audit record, not
        1,000. An item's outcome leaves out the accounts as they then stood: its entries' `balance_after` say
        the same, and a batch's result stays near 300 bytes an item."""
        items: list[dict[str, Any]] = []
        for index, item in enumerate(command.items):
            outcome = self.settle(item, operation.item(index))
            items.append({"status": str(outcome.status), **(outcome.outcome_json() or {})})
        self.events.append(operation.event("batch.settled", command.tenant_id, {"items": items}, self.now))
        return {"items": items}

    def _create_account(self, command: CreateAccount, operation: Operation) -> dict[str, object]:
        if command.account_id is not None and (command.tenant_id, command.account_id) in self.accounts:
            raise AccountExists(f"account {command.account_id} already exists", account_id=str(command.account_id))
        account = self._open(
            Account(
                id=command.account_id or new_id(),
                tenant_id=command.tenant_id,
                currency=command.currency,
                kind=AccountKind.CUSTOMER,
                overdraft=command.overdraft,
                metadata=command.metadata,
                created_at=self.now,
            )
        )
        body = account_json(account)
        self._stage(operation, operation.event("account.created", command.tenant_id, {"account": body}, self.now))
        return {"account": body}

    def _customer_account(self, tenant_id: str, account_id: UUID) -> Account:
        account = self._account(tenant_id, account_id)
        if account is None or account.kind is not AccountKind.CUSTOMER:
            raise AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))
        return account

    def _patch_metadata(self, command: UpdateAccountMetadata, operation: Operation) -> dict[str, object]:
        account = self._customer_account(command.tenant_id, command.account_id)
        account.patch_metadata(command.metadata)
        self._touch(account)
        self.restated.add(account.key)
        body = account_json(account)
        self.events.append(operation.event("account.updated", command.tenant_id, {"account": body}, self.now))
        return {"account": body}

    def _change_status(self, command: ChangeAccountStatus, operation: Operation) -> dict[str, object]:
        account = self._customer_account(command.tenant_id, command.account_id)
        account.change_status(command.status)
        self._touch(account)
        self.restated.add(account.key)
        body = account_json(account)
        self.events.append(operation.event("account.status_changed", command.tenant_id, {"account": body}, self.now))
        return {"account": body}

    def _post(self, command: PostingCommand, operation: Operation) -> dict[str, object]:
        tenant = command.tenant_id
        kind, legs = legs_of(command)
        # Only credits and debits may touch a system account, and only the external one they name.
        external = external_account_id(tenant, command.amount.currency) if isinstance(command, Credit | Debit) else None
        touched: list[Account] = []
        for index, (account_id, _, currency) in enumerate(legs):
            try:
                touched.append(self._leg_account(tenant, account_id, currency, external))
            except LedgerError as error:
                if kind is TransactionKind.MULTI_LEG:
                    error.extensions.setdefault("leg", index)  # which leg, when there are many
                raise
        try:
            transaction = post_legs(
                transaction_id=new_id(),
                tenant_id=tenant,
                kind=kind,
                legs=[(account, amount) for account, (_, amount, _) in zip(touched, legs, strict=True)],
                metadata=command.metadata,
                created_at=self.now,
            )
        except LedgerError as error:
            failed = error.extensions.get("account_id")
            if kind is TransactionKind.MULTI_LEG and failed is not None:
                error.extensions.setdefault("leg", [str(leg[0]) for leg in legs].index(failed))
            raise
        return self._posted(transaction, touched, operation)

    def _reverse(self, command: ReverseTransaction, operation: Operation) -> dict[str, object]:
        tenant, key = command.tenant_id, (command.tenant_id, command.transaction_id)
        original = self.originals.get(key)
        if original is None:
            raise TransactionNotFound(
                f"transaction {command.transaction_id} does not exist", transaction_id=str(command.transaction_id)
            )
        legs = reversal_legs(original, amount=command.amount, reversed_so_far=self.reversed.get(key, 0))
        # A credit or a debit moved money across the ledger's edge: its reversal moves it back through the same
        # external account.
        edge = original.kind in (TransactionKind.CREDIT, TransactionKind.DEBIT)
        touched = [
            self._leg_account(tenant, account_id, currency, external_account_id(tenant, currency) if edge else None)
            for account_id, _, currency in legs
        ]
        transaction = post_legs(
            transaction_id=new_id(),
            tenant_id=tenant,
            kind=TransactionKind.REVERSAL,
            legs=[(account, amount) for account, (_, amount, _) in zip(touched, legs, strict=True)],
            metadata=command.metadata,
            created_at=self.now,
            reverses=original.id,
        )
        self.reversed[key] = self.reversed.get(key, 0) + transaction.amount_moved
        return self._posted(transaction, touched, operation)

    def _place_hold(self, command: CreateHold, operation: Operation) -> dict[str, object]:
        tenant, currency = command.tenant_id, command.amount.currency
        if command.hold_id is not None and (tenant, command.hold_id) in self.holds:
            raise HoldExists(f"hold {command.hold_id} already exists", hold_id=str(command.hold_id))
        source = self._leg_account(tenant, command.source_id, currency, None)
        destination = self._leg_account(tenant, command.destination_id, currency, None)
        hold = Hold(
            id=command.hold_id or new_id(),
            tenant_id=tenant,
            source_id=source.id,
            destination_id=destination.id,
            currency=currency,
            amount=command.amount.amount,
            expires_at=command.expires_at,
            created_at=self.now,
            metadata=dict(command.metadata),
        )
        if hold.expired_at(self.now):
            raise HoldExpired(f"the hold would expire at {hold.expires_at}, which has passed", hold_id=str(hold.id))
        place_hold(hold, source, destination)
        self._touch(source)
        self._touch(destination)
        self.holds[hold.key] = hold
        self.placed.append(PlacedHold(hold, operation.id))
        return self._hold_changed("hold.created", hold, source, destination, operation)

    def _locked_hold(self, tenant_id: str, hold_id: UUID) -> tuple[Hold, Account, Account]:
        hold = self.holds.get((tenant_id, hold_id))
        if hold is None:
            raise HoldNotFound(f"hold {hold_id} does not exist", hold_id=str(hold_id))
        source, destination = self._account(tenant_id, hold.source_id), self._account(tenant_id, hold.destination_id)
        if source is None or destination is None:  # placed after this group looked for it: run the group again
            raise TransientConflict(f"hold {hold_id} was placed while the group began")
        return hold, source, destination

    def _capture_hold(self, command: CaptureHold, operation: Operation) -> dict[str, object]:
        hold, source, destination = self._locked_hold(command.tenant_id, command.hold_id)
        amount = hold.capture_amount(command.amount, self.now)
        hold.release(source, destination, HoldStatus.CAPTURED)  # all of it: what is not captured is let go
        try:
            transaction = post_legs(
                transaction_id=new_id(),
                tenant_id=command.tenant_id,
                kind=TransactionKind.CAPTURE,
                legs=[(source, -amount), (destination, amount)],
                metadata=command.metadata,
                created_at=self.now,
            )
        except LedgerError:  # a frozen account, say: the hold stays as it was
            hold.reopen(source, destination)
            raise
        hold.captured_amount, hold.capture_transaction_id = amount, transaction.id
        self._hold_saved(hold)
        return self._posted(transaction, [source, destination], operation, hold=hold_json(hold))

    def _release_hold(self, command: VoidHold | ExpireHold, operation: Operation) -> dict[str, object]:
        hold, source, destination = self._locked_hold(command.tenant_id, command.hold_id)
        hold.ensure_pending()
        expiring = isinstance(command, ExpireHold)
        if isinstance(command, ExpireHold) and not hold.expired_at(command.as_of):
            raise ValidationFailed(f"hold {hold.id} expires at {hold.expires_at}", hold_id=str(hold.id))
        hold.release(source, destination, HoldStatus.EXPIRED if expiring else HoldStatus.VOIDED)
        self._touch(source)
        self._touch(destination)
        self._hold_saved(hold)
        return self._hold_changed(f"hold.{hold.status}", hold, source, destination, operation)

    def _hold_saved(self, hold: Hold) -> None:
        if all(placed.hold is not hold for placed in self.placed):  # one placed in this group is inserted as it ends
            self.changed_holds[hold.key] = hold

    def _hold_changed(
        self, event_type: str, hold: Hold, source: Account, destination: Account, operation: Operation
    ) -> dict[str, object]:
        result: dict[str, object] = {
            "hold": hold_json(hold),
            "accounts": [account_json(source), account_json(destination)],
        }
        self._stage(operation, operation.event(event_type, hold.tenant_id, result, self.now))
        return result

    def _posted(
        self, transaction: Transaction, touched: list[Account], operation: Operation, **extra: object
    ) -> dict[str, object]:
        """Record a transaction posted on `touched`, and its event; the operation's result."""
        for account in touched:
            self._touch(account)
        self.postings.append(Posting(transaction, operation.id, operation.batch_item))
        if len(self.postings) == POSTINGS_PER_STATEMENT:
            self._send_postings()
        result: dict[str, object] = {**extra, "transaction": transaction_json(transaction)}
        if operation.batch_item is None:  # a batch's item: its entries' balance_after say the same
            result["accounts"] = [account_json(a) for a in touched if a.kind is AccountKind.CUSTOMER]
            # The event is the operation's snapshot: the transaction, its entries and the balances they left.
            self.events.append(operation.event("transaction.posted", transaction.tenant_id, result, self.now))
        return result

    def _send_postings(self) -> None:
        """The postings so far and the accounts they (or anything else) changed, to the unit."""
        if self.postings:
            self.uow.ledger.append(self.postings)
            self.postings = []
        if self.changed:
            self.uow.accounts.save(list(self.changed.values()), restated=self.restated)
            self.changed, self.restated = {}, set()

    def _stage(self, operation: Operation, event: Event) -> None:
        """Stage the event of an operation's outcome; a batch's items stage none (see `_batch`)."""
        if operation.batch_item is None:
            self.events.append(event)
