"""Ports: what the use cases need from the outside world. Adapters implement them; fakes subclass them."""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID

from core.application.commands import Command
from core.application.views import OperationResult
from core.domain.errors import ServiceUnavailable
from core.domain.ids import new_id
from core.domain.model import Account, AccountKey, Hold, Transaction


@dataclass(frozen=True, slots=True)
class ExistingKey:
    """An idempotency key that was already claimed: by an earlier request, or by the ingress that queued us."""

    fingerprint: str
    operation: OperationResult
    age_s: float = 0.0  # seconds since the key was claimed, by the store's clock


# Events whose type starts so are administrative actions (an API key created or revoked): for the audit trail
# only. They travel the outbox and the relay like any event, but no webhook delivers them and `/v1/events`
# does not list them.
ADMIN_EVENT_PREFIX = "admin."


@dataclass(frozen=True, slots=True)
class Event:
    """A fact published after commit through the outbox. `id` lets consumers deduplicate."""

    type: str  # routing key on the `ledger.events` exchange, e.g. "transaction.posted"
    tenant_id: str
    payload: dict[str, Any]
    occurred_at: datetime
    id: UUID = field(default_factory=new_id)
    position: int | None = None  # its place in the outbox, the ledger's commit order; set once staged


@dataclass(frozen=True, slots=True)
class WriteSet:
    """The accounts a unit of work will lock and write, declared before it starts (any tenants')."""

    accounts: frozenset[AccountKey]


@dataclass(frozen=True, slots=True)
class Submission:
    """One command to settle under its idempotency key. `operation_id` names the operation if the key is new;
    a key the ingress already recorded keeps the operation it was recorded with."""

    command: Command
    idempotency_key: str
    operation_id: UUID
    # The command's JSON form (`Command.to_json()`) when the caller has it already, as a queue message carries
    # it: a batch's is 1,000 items, not written again.
    request: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A request to claim one (tenant, idempotency key) for one operation."""

    tenant_id: str
    key: str
    fingerprint: str
    operation_id: UUID
    command_type: str
    request: dict[str, Any]  # the command's JSON form, stored with the operation

    @classmethod
    def for_command(cls, command: Command, key: str, operation_id: UUID) -> Claim:
        request = command.to_json()
        return cls(command.tenant_id, key, command.fingerprint(request), operation_id, command.type, request)


@dataclass(frozen=True, slots=True)
class Posting:
    """A transaction to append, and the operation that posted it."""

    transaction: Transaction
    operation_id: UUID
    batch_item: int | None = None  # its index in the batch, when the operation is one


@dataclass(frozen=True, slots=True)
class Completion:
    """A settled outcome to store against its (tenant, idempotency key)."""

    tenant_id: str
    key: str
    outcome: OperationResult


# Set-based on purpose: a unit of work may settle many commands, and each port call is one statement.
class AccountRepository(abc.ABC):
    @abc.abstractmethod
    def lock(self, keys: Collection[AccountKey]) -> dict[AccountKey, Account]:
        """Lock the accounts among `keys` for update, in key order, of any tenants; absent ones are left
        out."""

    @abc.abstractmethod
    def add(self, accounts: Sequence[Account]) -> None:
        """Insert new accounts as they stand (balance and version included). Their ids were locked free."""

    @abc.abstractmethod
    def save(self, accounts: Sequence[Account], *, restated: Collection[AccountKey] = ()) -> None:
        """Store the balances and versions of locked accounts, and the status and metadata of those among them
        whose keys are in `restated`. A unit may save an account more than once; the last save stands."""


# A transaction, or a hold, by its full name: (tenant, id).
TransactionKey = tuple[str, UUID]
HoldKey = tuple[str, UUID]


@dataclass(frozen=True, slots=True)
class PlacedHold:
    """A new hold to insert, and the operation that placed it."""

    hold: Hold
    operation_id: UUID


class HoldRepository(abc.ABC):
    @abc.abstractmethod
    def lock(self, keys: Collection[HoldKey]) -> dict[HoldKey, Hold]:
        """Lock the holds among `keys` for update, as they stand; absent ones are left out."""

    @abc.abstractmethod
    def add(self, placed: Sequence[PlacedHold]) -> None:
        """Insert new holds, each with the operation that placed it."""

    @abc.abstractmethod
    def save(self, holds: Sequence[Hold]) -> None:
        """Store the status and capture of locked holds."""


class Ledger(abc.ABC):
    @abc.abstractmethod
    def append(self, postings: Sequence[Posting]) -> None:
        """Insert the transactions and their entries. A unit may call it several times as it goes (see
        `settle.POSTINGS_PER_STATEMENT`), so it should not wait for the store's answer: a failure surfaces at
        the latest at commit, and rolls the whole unit back."""

    @abc.abstractmethod
    def reversed_amounts(self, keys: Collection[TransactionKey]) -> dict[TransactionKey, int]:
        """What the reversals of each transaction moved so far (`Transaction.amount_moved`); absent: none. Read
        inside the unit, after its locks, so a reversal committed just before is counted."""


class IdempotencyStore(abc.ABC):
    @abc.abstractmethod
    def claim(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        """Claim each (tenant, key) for its operation; the keys are distinct. Returns the records of the keys
        that were already claimed (by an earlier request, or by the ingress that queued us); the others are
        claimed now. A unit that then settles a known key must not commit if another unit settled it
        concurrently."""

    @abc.abstractmethod
    def complete(self, completions: Sequence[Completion]) -> None:
        """Store settled outcomes against their keys (and operations)."""


class Outbox(abc.ABC):
    @abc.abstractmethod
    def stage(self, events: Sequence[Event]) -> None:
        """Record events to publish once this unit of work commits."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record of the audit trail. `id` is unique (an event's id): writing it twice keeps one."""

    id: str
    kind: str  # what it records, e.g. the event type "transaction.posted", or "request.received"
    tenant_id: str | None  # None: a request refused before its API key was known
    occurred_at: datetime
    operation_id: str | None  # links it to its operation, when it has one
    idempotency_key: str | None
    document: dict[str, Any]
    position: int | None = None  # the ledger's commit order (the outbox position), for replay


class AuditStore(abc.ABC):
    """The audit trail (MongoDB): append-only, written in batches, never on the request or posting path."""

    @abc.abstractmethod
    def write(self, records: Sequence[AuditRecord]) -> int:
        """Store the records, skipping ids already stored; returns how many were new. Raises
        `AuditUnavailable` when the store cannot be reached (the caller keeps the records and tries later)."""

    @abc.abstractmethod
    def count(self, *, tenant_id: str | None = None) -> int: ...

    @abc.abstractmethod
    def in_commit_order(self) -> Iterator[AuditRecord]:
        """Every record that knows its place in the ledger's commit order, in that order (for replay)."""


class AuditUnavailable(Exception):
    """The audit store cannot be reached; nothing was lost, the records wait in their queue."""


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A mutating request as an ingress received and answered it, accepted or refused, for the audit trail.
    Built with its secrets already cut out (`core.domain.secrets`): credential headers, and any token that
    looks like a secret wherever the client put it."""

    request_id: str  # the id the logs and the problem's `instance` carry
    received_at: datetime
    node: str  # which ingress answered: host:port
    tenant_id: str | None  # None when refused before its API key was known
    api_key_id: str | None
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: str | None  # as received (UTF-8, undecodable bytes replaced); None when refused before it was read
    status: int
    answer: str | None  # the body of the answer given
    idempotency_key: str | None


class RequestTrail(abc.ABC):
    """Where the ingress hands every mutating request, once answered, on its way to the audit store. Never on
    the audit store's time: the adapter only queues it (RabbitMQ)."""

    @abc.abstractmethod
    async def record(self, request: ReceivedRequest) -> None:
        """Queue the request's record. Returns once the queue confirmed it, or after the adapter's bound on
        waiting (it keeps trying meanwhile, in the background). Never raises."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Queue what is still waiting, within a short bound; what cannot be queued is logged as lost."""


# --- the accept phase (ingress): async, on the event loop ----------------------------------------------------
class OperationRecords(abc.ABC):
    """Pending operations as the ingress records them, before their command is queued."""

    @abc.abstractmethod
    async def record(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        """Claim each (tenant, key) for its operation as pending, all in one commit; the keys are distinct.
        Returns the keys that were already claimed, as `IdempotencyStore.claim` does. Raises
        `StoreUnavailable` when the store cannot be reached, `TransientConflict` when a claim raced."""

    @abc.abstractmethod
    async def withdraw(self, claims: Sequence[Claim]) -> None:
        """Forget pending operations whose commands never reached the queue (a no-op for any that settled)."""

    @abc.abstractmethod
    async def find(self, tenant_id: str, operation_id: UUID) -> OperationResult | None:
        """The tenant's operation as it stands, pending or settled."""


class QueueUnavailable(Exception):
    """The command queue did not confirm a command: it may not have it."""


class CommandQueue(abc.ABC):
    """Where accepted commands wait for a worker (RabbitMQ)."""

    @abc.abstractmethod
    async def publish(self, claims: Sequence[Claim]) -> None:
        """Queue the claims' commands durably, as one message, and return once the queue confirmed it; raises
        `QueueUnavailable`. Concurrent calls are pipelined: each waits for its own confirm only."""


class QueuedKeys(abc.ABC):
    """A cache (Redis) of the keys whose command the queue confirmed. Only ever a hint that spares a
    duplicate the in-flight answer: losing it costs a retry, never an operation."""

    @abc.abstractmethod
    async def remember(self, claims: Sequence[Claim]) -> None:
        """Note that the claims' commands were confirmed; never raises."""

    @abc.abstractmethod
    async def queued_operation(self, tenant_id: str, key: str) -> UUID | None:
        """The operation the key's confirmed command belongs to; None when unknown (or the cache is down)."""


class StoreUnavailable(ServiceUnavailable):
    """The database cannot be reached (down, restarting, out of connections): nobody's command is at fault,
    so the caller waits and tries the same work again instead of blaming or splitting it."""


class UnitOfWork(abc.ABC):
    """One atomic, SERIALIZABLE unit. Leaving the `with` block without `commit()` rolls back."""

    accounts: AccountRepository
    ledger: Ledger
    holds: HoldRepository
    idempotency: IdempotencyStore
    outbox: Outbox
    write_set: WriteSet | None = None

    def writing(self, accounts: Collection[AccountKey]) -> Self:
        """Declare, before entering, the accounts this unit will lock and write.

        The unit then waits for their other writers before it takes its snapshot, so a hot account makes
        writers queue instead of failing each other with serialization errors and retrying at random.
        """
        self.write_set = WriteSet(frozenset(accounts)) if accounts else None
        return self

    @abc.abstractmethod
    def find_holds(self, keys: Collection[HoldKey]) -> dict[HoldKey, Hold]:
        """Holds as they stand, read before the unit begins: their accounts never change, so the accounts a
        capture, void or expiry writes are known before its locks are taken. Their status is read again, locked,
        inside the unit (`holds.lock`)."""

    @abc.abstractmethod
    def find_transactions(self, keys: Collection[TransactionKey]) -> dict[TransactionKey, Transaction]:
        """Posted transactions with their entries, read before the unit begins (posted transactions never
        change), so that the accounts a reversal writes are known before its locks are taken."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rollback()

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def rollback(self) -> None: ...


@dataclass(frozen=True, slots=True)
class EntryView:
    """One entry as a reader sees it: the entry plus its transaction's id, kind and time."""

    transaction_id: UUID
    transaction_kind: str
    account_id: UUID
    amount: int
    currency: str
    sequence: int
    balance_after: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class EntryPage:
    entries: list[EntryView]
    next_cursor: str | None  # opaque; None on the last page


def listing_digest(tenant_id: str, *parts: object) -> str:
    """Ties a cursor to its tenant and listing (which one, its filters, its order): any other refuses it."""
    canonical = json.dumps([tenant_id, *[p.isoformat() if isinstance(p, datetime) else p for p in parts]])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AccountFilters:
    """What `GET /v1/accounts` may ask for; all given ones must hold."""

    currency: str | None = None
    status: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # (key, value) pairs the account's metadata must hold
    newest_first: bool = True

    def digest(self, tenant_id: str) -> str:
        return listing_digest(
            tenant_id, "accounts", self.currency, self.status, sorted(self.metadata), self.newest_first
        )


@dataclass(frozen=True, slots=True)
class AccountPage:
    accounts: list[Account]
    next_cursor: str | None  # opaque; None on the last page


@dataclass(frozen=True, slots=True)
class TransactionFilters:
    """What `GET /v1/transactions` may ask for; all given ones must hold."""

    account_id: UUID | None = None  # transactions with an entry on this account
    kind: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    metadata: tuple[tuple[str, str], ...] = ()
    newest_first: bool = True

    def digest(self, tenant_id: str) -> str:
        account = None if self.account_id is None else str(self.account_id)
        return listing_digest(
            tenant_id,
            "transactions",
            account,
            self.kind,
            self.since,
            self.until,
            sorted(self.metadata),
            self.newest_first,
        )


@dataclass(frozen=True, slots=True)
class TransactionPage:
    transactions: list[tuple[Transaction, UUID]]  # each with the operation that posted it
    next_cursor: str | None  # opaque; None on the last page


@dataclass(frozen=True, slots=True)
class OperationPage:
    operations: list[tuple[OperationResult, datetime]]  # each with when it was accepted
    next_cursor: str | None  # opaque; None on the last page


class LedgerQueries(abc.ABC):
    """Read side: plain reads, no locks, never inside a posting."""

    @abc.abstractmethod
    def account(self, tenant_id: str, account_id: UUID) -> Account | None: ...

    @abc.abstractmethod
    def entries(
        self,
        tenant_id: str,
        account_id: UUID,
        *,
        limit: int,
        cursor: str | None = None,
        newest_first: bool = True,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> EntryPage:
        """A page of an account's entries, keyset-paginated; `since` inclusive, `until` exclusive."""

    @abc.abstractmethod
    def operation(self, tenant_id: str, operation_id: UUID) -> OperationResult | None: ...
