"""PostgreSQL unit of work: one SERIALIZABLE transaction per use-case call (one command or a whole group of
them), in pipeline mode.

A unit that declared its write set (the accounts it will write) first queues behind their other writers
on session advisory locks, taken in key order in autocommit before BEGIN (1 round trip). Only then does it
begin and take its snapshot, so it never meets a newer version of a row it locks: without this, every
writer that waited on a hot account's row lock would fail with 40001 "concurrent update" once the holder
committed, and hot accounts would turn into a lottery of retries. The accounts' rows are read (see
LOCK_ACCOUNTS) with BEGIN and sent with the idempotency claim (1). New accounts, transactions, entries,
balances, outcomes, outbox, COMMIT and the advisory unlock are queued and flushed at commit (1); a batch's
postings and balances are sent in chunks while it settles (see `settle.POSTINGS_PER_STATEMENT`), and nothing
waits for their answers. Three round trips per unit, however many commands it settles.

SQLSTATE 40001 (serialization failure), 40P01 (deadlock) and 55P03 (lock timeout) become
`TransientConflict` so the application's retry policy re-runs the whole unit; a server that cannot be
reached becomes `StoreUnavailable`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import orjson
import psycopg
from psycopg import Connection, Cursor, Pipeline
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from core.adapters import json_text
from core.application.ports import (
    AccountRepository,
    Claim,
    Completion,
    Event,
    ExistingKey,
    HoldKey,
    HoldRepository,
    IdempotencyStore,
    Ledger,
    Outbox,
    PlacedHold,
    Posting,
    StoreUnavailable,
    TransactionKey,
    UnitOfWork,
    WriteSet,
)
from core.application.views import OperationResult, OperationStatus
from core.domain.errors import TransientConflict
from core.domain.model import (
    Account,
    AccountKey,
    AccountKind,
    AccountStatus,
    Entry,
    Hold,
    HoldStatus,
    OverdraftPolicy,
    Transaction,
    TransactionKind,
)

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

ACCOUNT_COLUMNS = (
    "id, tenant_id, currency, kind, overdraft_limit, status, posted_balance, version, metadata, created_at,"
    " pending_debits, pending_credits"
)
# Accounts by their (tenant, id) keys, one primary-key probe each (a group may serve many tenants). Read, not
# row-locked: the unit's advisory locks already made every other writer of these accounts wait, and its snapshot
# was taken after them, so no newer version of these rows can exist; were one written all the same (a writer
# that declared no write set), SERIALIZABLE refuses the second update with 40001 and the unit runs again. A
# FOR UPDATE here cost a WAL record and a dirtied page per account, a quarter of a batch's reads (2,000 accounts).
LOCK_ACCOUNTS = (
    f"SELECT {ACCOUNT_COLUMNS}"  # no column of k shares a name with one of accounts
    " FROM json_to_recordset(%s::json) AS k(t text, i uuid) JOIN accounts a ON a.tenant_id = k.t AND a.id = k.i"
)


def keys_json(keys: Collection[tuple[str, UUID]]) -> str:
    """(tenant, id) keys of accounts, holds or transactions as the JSON array the statements below take (in any
    order: a statement that locks orders its rows itself)."""
    return orjson.dumps([{"t": tenant, "i": key_id} for tenant, key_id in keys]).decode()


# An account's session advisory lock key, from its tenant and id: a 64-bit hash PostgreSQL computes from the
# keys' JSON the unit sends anyway to read the accounts (hashing 2,000 accounts here and sending them as a
# bigint array cost the worker 13 ms a batch). The tenant is hashed in, so a tenant that picks another's account
# id does not queue behind its writers (neither holds '/'); two accounts sharing a key (one chance in 2^64 per
# pair) merely queue behind each other. A worker that hashed otherwise (during an upgrade) does not queue
# behind this one, and SERIALIZABLE still refuses whichever of the two commits second.
ADVISORY_KEY = "hashtextextended({tenant} || '/' || {account}, 0)"
# One statement for the whole set; PostgreSQL evaluates a volatile target list after ORDER BY, so the locks
# are taken in key order and two units never deadlock.
LOCK_WRITE_SET = (
    "SELECT pg_advisory_lock(k) FROM (SELECT DISTINCT "
    + ADVISORY_KEY.format(tenant="k.t", account="k.i")
    + " AS k FROM json_to_recordset(%s::json) AS k(t text, i text)) AS keys ORDER BY k"
)


# Enum members by their stored text, and overdraft policies by their limit: a batch reads 2,000 accounts, and
# calling an enum class or a validating constructor for each cost a tenth of its time in the worker (py-spy).
ACCOUNT_KINDS = {kind.value: kind for kind in AccountKind}
ACCOUNT_STATUSES = {status.value: status for status in AccountStatus}
overdraft_policy = functools.lru_cache(maxsize=1024)(OverdraftPolicy)


def account_from_row(row: Sequence[Any]) -> Account:
    return Account(
        id=row[0],
        tenant_id=row[1],
        currency=row[2],
        kind=ACCOUNT_KINDS[row[3]],
        overdraft=overdraft_policy(row[4]),
        status=ACCOUNT_STATUSES[row[5]],
        balance=row[6],
        version=row[7],
        metadata=row[8],
        created_at=row[9],
        pending_debits=row[10],
        pending_credits=row[11],
    )


HOLD_COLUMNS = (
    "tenant_id, id, source_id, destination_id, currency, amount, expires_at, created_at, metadata, status,"
    " captured_amount, capture_transaction_id"
)
# Holds by their (tenant, id) keys, one primary-key probe each; locked in key order, like accounts.
LOCK_HOLDS = (
    f"SELECT {HOLD_COLUMNS} FROM json_to_recordset(%s::json) AS k(t text, i uuid)"
    " JOIN holds h ON h.tenant_id = k.t AND h.id = k.i ORDER BY h.tenant_id, h.id FOR UPDATE OF h"
)


def hold_from_row(row: Sequence[Any]) -> Hold:
    return Hold(
        tenant_id=row[0],
        id=row[1],
        source_id=row[2],
        destination_id=row[3],
        currency=row[4],
        amount=row[5],
        expires_at=row[6],
        created_at=row[7],
        metadata=row[8],
        status=HoldStatus(row[9]),
        captured_amount=row[10],
        capture_transaction_id=row[11],
    )


def accounts_by_key(rows: Sequence[Sequence[Any]]) -> dict[AccountKey, Account]:
    accounts = (account_from_row(row) for row in rows)
    return {account.key: account for account in accounts}


# A transaction and one of its entries per row (rows of one transaction are consecutive).
TRANSACTION_COLUMNS = (
    "t.id, t.tenant_id, t.kind, t.operation_id, t.metadata, t.created_at, t.reverses,"
    " e.account_id, e.amount, e.currency, e.sequence, e.balance_after"
)
# Transactions by their (tenant, id) keys, one primary-key probe each.
FIND_TRANSACTIONS = (
    f"SELECT {TRANSACTION_COLUMNS} FROM json_to_recordset(%s::json) AS k(t text, i uuid)"
    " JOIN transactions t ON t.id = k.i AND t.tenant_id = k.t JOIN entries e ON e.transaction_id = t.id"
    " ORDER BY t.id, e.account_id, e.sequence"
)


def transactions_from_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[Transaction, UUID]]:
    """(transaction, its operation) for each transaction of TRANSACTION_COLUMNS rows, in first-seen order."""
    grouped: dict[UUID, list[Sequence[Any]]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    found = []
    for group in grouped.values():
        tx_id, tenant, kind, operation_id, metadata, created_at, reverses = group[0][:7]
        entries = tuple(Entry(*row[7:]) for row in group)
        transaction = Transaction(tx_id, tenant, TransactionKind(kind), entries, metadata, created_at, reverses)
        found.append((transaction, operation_id))
    return found


def operation_from_row(operation_id: UUID, status: str, response: dict[str, Any] | None) -> OperationResult:
    response = response or {}
    return OperationResult(operation_id, OperationStatus(status), response.get("result"), response.get("problem"))


def raise_translated(exc: psycopg.Error) -> None:
    """Map PostgreSQL's "try again" errors to the application's TransientConflict, and a server that cannot
    be reached (connection refused or lost, shut down, pool exhausted) to StoreUnavailable. A statement
    timeout stays what it is: the work itself was too slow, and waiting would not help it."""
    if exc.sqlstate in RETRYABLE_SQLSTATES:
        raise TransientConflict(f"{exc.sqlstate}: {exc.diag.message_primary}") from exc
    if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, psycopg.errors.QueryCanceled):
        raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc


# A document this long (characters of JSON) goes to PostgreSQL as a parameter of its own, not inside a group's
# JSON array: json_to_recordset lexes every character of its input, and a batch's 600 KB event cost 12 ms
# there, against 3 ms as a parameter (pg_stat_statements, EXPLAIN ANALYZE). Shorter ones, the common case,
# keep one statement for the whole group.
OWN_PARAMETER_CHARS = 16 * 1024


def rows_json(rows: Sequence[dict[str, Any]]) -> str:
    """A group's rows as one JSON array, the single parameter of a `json_to_recordset` statement."""
    return json_text.dumps(rows)


# Every write below is one statement for the whole group, whatever its size. Its rows travel as one JSON
# array that PostgreSQL unpacks with json_to_recordset(), typed by the column list: one json.dumps in C here
# instead of escaping every element of a dozen parallel arrays in Python (10x the CPU, measured), and the
# statement text never changes, so it stays prepared. Integers arrive exact (JSON numbers become bigint from
# their text), nested objects become jsonb, UUIDs and timestamps travel as their text.
class PostgresAccounts(AccountRepository):
    def __init__(self, conn: Connection[TupleRow], *, prelocked: Cursor[TupleRow] | None = None) -> None:
        self.conn = conn
        self._prelocked_cursor = prelocked  # the write set's rows, locked as the unit began
        self._prelocked: dict[AccountKey, Account] | None = None

    def lock(self, keys: Collection[AccountKey]) -> dict[AccountKey, Account]:
        if self._prelocked_cursor is not None:
            if self._prelocked is None:
                self._prelocked = accounts_by_key(self._prelocked_cursor.fetchall())
            return {k: self._prelocked[k] for k in keys if k in self._prelocked}
        return accounts_by_key(self.conn.execute(LOCK_ACCOUNTS, (keys_json(keys),)).fetchall())

    def add(self, accounts: Sequence[Account]) -> None:
        self.conn.execute(
            "INSERT INTO accounts (id, tenant_id, currency, kind, system_role, overdraft_limit, status,"
            " posted_balance, version, metadata, created_at, updated_at, pending_debits, pending_credits)"
            " SELECT id, t, c, k, CASE WHEN k = 'system' THEN 'external' END, o, s, b, v, m, at, at, pd, pc"
            " FROM json_to_recordset(%s::json) AS u(id uuid, t text, c text, k text, o bigint, s text, b bigint,"
            " v bigint, m jsonb, at timestamptz, pd bigint, pc bigint)",
            (
                rows_json(
                    [
                        {
                            "id": a.id,
                            "t": a.tenant_id,
                            "c": a.currency,
                            "k": a.kind,
                            "o": a.overdraft.limit,
                            "s": a.status,
                            "b": a.balance,
                            "v": a.version,
                            "m": a.metadata,
                            "at": a.created_at,
                            "pd": a.pending_debits,
                            "pc": a.pending_credits,
                        }
                        for a in accounts
                    ]
                ),
            ),
        )

    def save(self, accounts: Sequence[Account], *, restated: Collection[AccountKey] = ()) -> None:
        # An account's status and metadata travel only when they changed: most saves are a posting's balances,
        # and a batch's 2,000 unchanged metadata objects were serialized, sent and parsed back into jsonb for
        # nothing.
        self.conn.execute(
            "UPDATE accounts SET posted_balance = u.b, version = u.v, status = coalesce(u.s, accounts.status),"
            " metadata = coalesce(u.m, accounts.metadata), pending_debits = u.pd, pending_credits = u.pc,"
            " updated_at = now()"
            " FROM json_to_recordset(%s::json)"
            " AS u(t text, id uuid, b bigint, v bigint, s text, m jsonb, pd bigint, pc bigint)"
            " WHERE accounts.tenant_id = u.t AND accounts.id = u.id",
            (rows_json([saved_account_row(a, restated=a.key in restated) for a in accounts]),),
        )


def saved_account_row(account: Account, *, restated: bool) -> dict[str, Any]:
    row = {
        "t": account.tenant_id,
        "id": account.id,
        "b": account.balance,
        "v": account.version,
        "pd": account.pending_debits,
        "pc": account.pending_credits,
    }
    if restated:
        row["s"], row["m"] = account.status, account.metadata
    return row


class PostgresHolds(HoldRepository):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def lock(self, keys: Collection[HoldKey]) -> dict[HoldKey, Hold]:
        holds = (hold_from_row(row) for row in self.conn.execute(LOCK_HOLDS, (keys_json(keys),)).fetchall())
        return {hold.key: hold for hold in holds}

    def add(self, placed: Sequence[PlacedHold]) -> None:
        self.conn.execute(
            "INSERT INTO holds (tenant_id, id, source_id, destination_id, currency, amount, expires_at, operation_id,"
            " metadata, created_at, updated_at)"
            " SELECT t, id, s, d, c, a, x, o, m, at, at FROM json_to_recordset(%s::json)"
            " AS u(t text, id uuid, s uuid, d uuid, c text, a bigint, x timestamptz, o uuid, m jsonb, at timestamptz)",
            (
                rows_json(
                    [
                        {
                            "t": p.hold.tenant_id,
                            "id": p.hold.id,
                            "s": p.hold.source_id,
                            "d": p.hold.destination_id,
                            "c": p.hold.currency,
                            "a": p.hold.amount,
                            "x": p.hold.expires_at,
                            "o": p.operation_id,
                            "m": p.hold.metadata,
                            "at": p.hold.created_at,
                        }
                        for p in placed
                    ]
                ),
            ),
        )

    def save(self, holds: Sequence[Hold]) -> None:
        self.conn.execute(
            "UPDATE holds SET status = u.s, captured_amount = u.ca, capture_transaction_id = u.ct, updated_at = now()"
            " FROM json_to_recordset(%s::json) AS u(t text, id uuid, s text, ca bigint, ct uuid)"
            " WHERE holds.tenant_id = u.t AND holds.id = u.id",
            (
                rows_json(
                    [
                        {
                            "t": h.tenant_id,
                            "id": h.id,
                            "s": h.status,
                            "ca": h.captured_amount,
                            "ct": h.capture_transaction_id,
                        }
                        for h in holds
                    ]
                ),
            ),
        )


class PostgresLedger(Ledger):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def append(self, postings: Sequence[Posting]) -> None:
        # A group's postings share its time and, most often, a tenant: both travel once per statement rather than
        # in every row, since PostgreSQL parses each row's fields, a timestamp's most dearly (a batch's 2,000
        # entries and 1,000 transactions).
        shared: dict[tuple[str, datetime], list[Posting]] = {}
        for posting in postings:
            shared.setdefault((posting.transaction.tenant_id, posting.transaction.created_at), []).append(posting)
        for (tenant, created_at), group in shared.items():
            self.conn.execute(APPEND_TRANSACTIONS, (tenant, created_at, rows_json([transaction_row(p) for p in group])))
            entries = [entry_row(p.transaction.id, e) for p in group for e in p.transaction.entries]
            self.conn.execute(APPEND_ENTRIES, (tenant, created_at, rows_json(entries)))

    def reversed_amounts(self, keys: Collection[TransactionKey]) -> dict[TransactionKey, int]:
        rows = self.conn.execute(REVERSED_AMOUNTS, (keys_json(keys),)).fetchall()
        return {(row[0], row[1]): row[2] for row in rows}


APPEND_TRANSACTIONS = (
    "INSERT INTO transactions (id, tenant_id, kind, operation_id, batch_item, reverses, metadata, created_at)"
    " SELECT id, %s, k, o, i, r, m, %s FROM json_to_recordset(%s::json)"
    " AS u(id uuid, k text, o uuid, i integer, r uuid, m jsonb)"
)
APPEND_ENTRIES = (
    "INSERT INTO entries (transaction_id, tenant_id, account_id, sequence, amount, currency, balance_after, created_at)"
    " SELECT x, %s, a, s, m, c, b, %s FROM json_to_recordset(%s::json)"
    " AS u(x uuid, a uuid, s bigint, m bigint, c text, b bigint)"
)


def transaction_row(posting: Posting) -> dict[str, Any]:
    tx = posting.transaction
    return {
        "id": tx.id,
        "k": tx.kind,
        "o": posting.operation_id,
        "i": posting.batch_item,
        "r": tx.reverses,
        "m": tx.metadata,
    }


def entry_row(transaction_id: UUID, entry: Entry) -> dict[str, Any]:
    return {
        "x": transaction_id,
        "a": entry.account_id,
        "s": entry.sequence,
        "m": entry.amount,
        "c": entry.currency,
        "b": entry.balance_after,
    }


# What the reversals of each transaction moved: their credits, summed, found through transactions_reverses_idx.
REVERSED_AMOUNTS = (
    "SELECT r.tenant_id, r.reverses, sum(e.amount)::bigint"
    " FROM json_to_recordset(%s::json) AS k(t text, i uuid)"
    " JOIN transactions r ON r.tenant_id = k.t AND r.reverses = k.i"
    " JOIN entries e ON e.transaction_id = r.id AND e.amount > 0"
    " GROUP BY r.tenant_id, r.reverses"
)


class PostgresIdempotency(IdempotencyStore):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def claim(self, claims: Sequence[Claim]) -> dict[tuple[str, str], ExistingKey]:
        # One statement, one round trip, for the whole group (see CLAIM_KEYS). Under SERIALIZABLE a concurrent
        # claim of the same key makes the INSERT fail with 40001 once the other commits; the retry replays.
        rows = self.conn.execute(CLAIM_KEYS, (claims_json(claims),)).fetchall()
        return existing_keys(claims, rows)

    def complete(self, completions: Sequence[Completion]) -> None:
        rows: list[dict[str, Any]] = []
        for c in completions:
            response = json_text.dumps(c.outcome.outcome_json())
            if len(response) < OWN_PARAMETER_CHARS:
                rows.append({"t": c.tenant_id, "k": c.key, "s": c.outcome.status, "r": orjson.Fragment(response)})
            else:  # a batch's outcome: 1,000 items
                self.conn.execute(COMPLETE_KEY, (str(c.outcome.status), response, c.tenant_id, c.key))
        if rows:
            self.conn.execute(COMPLETE_KEYS, (rows_json(rows),))


COMPLETE_KEYS = (
    "UPDATE idempotency_keys k SET status = u.s, response = u.r, settled_at = now()"
    " FROM json_to_recordset(%s::json) AS u(t text, k text, s text, r json)"
    " WHERE k.tenant_id = u.t AND k.key = u.k"
)
COMPLETE_KEY = (
    "UPDATE idempotency_keys SET status = %s, response = %s::json, settled_at = now() WHERE tenant_id = %s AND key = %s"
)


# Claims a group's (tenant, key)s in one statement, for the sync path, the queue path (keys the ingress
# recorded) and the ingress itself. The CTE inserts each new key and its operation, and the last SELECT returns
# the keys that already existed (with their age, for the ingress's in-flight answer). It looks only for keys
# the insert did not take, so a fresh claim reads no index page (a SERIALIZABLE predicate lock there would make
# unrelated claims conflict). A concurrent claim of the same key makes the INSERT wait; once the other commits,
# the key is neither inserted nor (in this statement's snapshot) found, and `existing_keys` reports the race.
# Two deliveries settling one pending key both update its row and lock the same accounts, so SERIALIZABLE
# lets only one of them commit.
CLAIM_KEYS = (
    "WITH input AS ("
    "  SELECT * FROM json_to_recordset(%s::json)"
    "  AS i(tenant text, key text, fp text, op uuid, type text, request json)"
    "), claimed AS ("
    "  INSERT INTO idempotency_keys (tenant_id, key, fingerprint, operation_id)"
    "  SELECT tenant, key, fp, op FROM input ON CONFLICT DO NOTHING RETURNING tenant_id, key, operation_id"
    "), recorded AS ("
    "  INSERT INTO operations (id, tenant_id, command_type, request)"
    "  SELECT i.op, i.tenant, i.type, i.request FROM input i JOIN claimed c ON c.operation_id = i.op"
    ") SELECT k.tenant_id, k.key, k.fingerprint, k.operation_id, k.status, k.response,"
    "  extract(epoch FROM now() - k.created_at)::float8"
    " FROM input i JOIN idempotency_keys k ON k.tenant_id = i.tenant AND k.key = i.key"
    " WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.tenant_id = i.tenant AND c.key = i.key)"
    " UNION ALL SELECT tenant_id, key, NULL, NULL, NULL, NULL, NULL FROM claimed"
)


def claims_json(claims: Sequence[Claim]) -> str:
    return rows_json(
        [
            {
                "tenant": c.tenant_id,
                "key": c.key,
                "fp": c.fingerprint,
                "op": c.operation_id,
                "type": c.command_type,
                "request": c.request,
            }
            for c in claims
        ]
    )


def existing_keys(claims: Sequence[Claim], rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str], ExistingKey]:
    """The keys `CLAIM_KEYS` found claimed by other operations; raises `TransientConflict` when a claim raced.

    A key found still pending under the claim's own operation counts as claimed now: an earlier attempt of
    this group took it and committed (in autocommit, a statement run again for a raced neighbour), or the
    ingress recorded it for the worker that now settles it. Settled, it is always reported: it must replay."""
    if len(rows) != len(claims):  # a conflicting claim committed or rolled back while we waited on it
        raise TransientConflict("idempotency key claim raced with a concurrent claim")
    ours = {(c.tenant_id, c.key): c.operation_id for c in claims}
    return {
        (tenant, key): ExistingKey(fp, operation_from_row(op_id, status, response), age_s=age)
        for tenant, key, fp, op_id, status, response, age in rows
        if fp is not None and not (op_id == ours[(tenant, key)] and status == "pending")
    }


class PostgresOutbox(Outbox):
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn

    def stage(self, events: Sequence[Event]) -> None:
        rows: list[dict[str, Any]] = []
        for e in events:
            payload = json_text.dumps(e.payload)
            if len(payload) < OWN_PARAMETER_CHARS:
                rows.append(
                    {"i": e.id, "t": e.type, "tn": e.tenant_id, "p": orjson.Fragment(payload), "at": e.occurred_at}
                )
                continue
            # A batch's snapshot. The events staged before it go first: the outbox's order is the commit order.
            self._insert(rows)
            rows = []
            self.conn.execute(STAGE_EVENT, (e.id, e.type, e.tenant_id, payload, e.occurred_at))
        self._insert(rows)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.conn.execute(STAGE_EVENTS, (rows_json(rows),))


STAGE_EVENTS = (
    "INSERT INTO outbox (event_id, event_type, tenant_id, payload, occurred_at)"
    " SELECT i, t, tn, p, at FROM json_to_recordset(%s::json) AS u(i uuid, t text, tn text, p json, at timestamptz)"
)
STAGE_EVENT = (
    "INSERT INTO outbox (event_id, event_type, tenant_id, payload, occurred_at) VALUES (%s, %s, %s, %s::json, %s)"
)


class PostgresUnitOfWork(UnitOfWork):
    """Borrows a pooled connection for one SERIALIZABLE transaction and gives it back on exit.

    The connection runs in autocommit with explicit BEGIN/COMMIT so the advisory locks of the write set can
    be taken before the transaction starts. They are released with COMMIT or ROLLBACK; a connection that
    might still hold them is closed rather than returned to the pool.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def __enter__(self) -> Self:
        self._borrowed: AbstractContextManager[Connection[TupleRow]] = self.pool.connection()
        try:
            self.conn: Connection[TupleRow] = self._borrowed.__enter__()
        except psycopg.Error as exc:  # the pool's timeout included
            raise_translated(exc)
            raise
        self._pipeline: AbstractContextManager[Pipeline] | None = None
        self._holds_advisory_locks = False
        try:
            prelocked = self._begin(self.write_set)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self.idempotency = PostgresIdempotency(self.conn)
        self.accounts = PostgresAccounts(self.conn, prelocked=prelocked)
        self.ledger = PostgresLedger(self.conn)
        self.holds = PostgresHolds(self.conn)
        self.outbox = PostgresOutbox(self.conn)
        return self

    def find_holds(self, keys: Collection[HoldKey]) -> dict[HoldKey, Hold]:
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(LOCK_HOLDS.removesuffix(" FOR UPDATE OF h"), (keys_json(keys),)).fetchall()
        except psycopg.Error as exc:
            raise_translated(exc)
            raise
        holds = (hold_from_row(row) for row in rows)
        return {hold.key: hold for hold in holds}

    def find_transactions(self, keys: Collection[TransactionKey]) -> dict[TransactionKey, Transaction]:
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(FIND_TRANSACTIONS, (keys_json(keys),)).fetchall()
        except psycopg.Error as exc:
            raise_translated(exc)
            raise
        return {(t.tenant_id, t.id): t for t, _ in transactions_from_rows(rows)}

    def _begin(self, write_set: WriteSet | None) -> Cursor[TupleRow] | None:
        self.conn.autocommit = True  # reset_session turns it off again when the connection goes back
        if write_set is not None:
            self._holds_advisory_locks = True  # before asking: a timeout on the second key keeps the first
            accounts = keys_json(write_set.accounts)
            try:
                self.conn.execute(LOCK_WRITE_SET, (accounts,))
            except psycopg.errors.QueryCanceled as exc:
                # Each lock wait is bounded by lock_timeout, but a group waits for many accounts in turn and
                # may outlast the statement timeout while every wait is short: that is contention, not a
                # slow statement, so the unit is retried like any other conflict.
                raise TransientConflict("waited too long for the accounts' other writers") from exc
        pipeline = self._pipeline = self.conn.pipeline()
        pipeline.__enter__()
        self.conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE", prepare=False)
        # Point lookups by primary key must stay index scans, each joined row by row (nested loop): a
        # sequential scan, or a merge or hash join that walks a whole index, would take a relation-wide
        # SIREAD lock and make every concurrent writer of the table a conflict. The planner cannot know that
        # a group's json_to_recordset holds a few hundred rows of a table of millions, so it is told.
        self.conn.execute(
            "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true),"
            " set_config('enable_mergejoin', 'off', true)",
            prepare=False,
        )
        if write_set is None:
            return None
        return self.conn.execute(LOCK_ACCOUNTS, (accounts,))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        errors: list[psycopg.Error] = []
        try:
            if self._pipeline is not None:
                pipeline, self._pipeline = self._pipeline, None
                try:
                    # Flushes what is still queued; its errors surface here. Told nothing of `exc`, which
                    # wins anyway, so psycopg does not log the aborted pipeline as an ignored error.
                    pipeline.__exit__(None, None, None)
                except psycopg.Error as error:
                    errors.append(error)
            if self.conn.info.transaction_status is TransactionStatus.INERROR:
                # psycopg's own rollback also forgets the prepared statements whose Parse the failed
                # pipeline skipped (the unlock and transaction control below are never prepared).
                self.conn.rollback()
            in_transaction = self.conn.info.transaction_status is not TransactionStatus.IDLE
            if in_transaction or self._holds_advisory_locks:
                self._end("ROLLBACK" if in_transaction else None)
        except psycopg.Error as error:
            errors.append(error)
        finally:
            if self._holds_advisory_locks and not self.conn.closed:
                self.conn.close()  # the pool discards it and the server drops its locks
            self._borrowed.__exit__(exc_type, exc, tb)
        if exc is None and errors:
            raise_translated(errors[0])
            raise errors[0]
        if isinstance(exc, psycopg.Error):
            raise_translated(exc)

    def _end(self, statement: str | None) -> None:
        """COMMIT or ROLLBACK, and drop the advisory locks, in one round trip."""
        with self.conn.pipeline():  # leaving it syncs: any error, a failed COMMIT included, raises here
            if statement is not None:
                self.conn.execute(statement, prepare=False)
            if self._holds_advisory_locks:
                self.conn.execute("SELECT pg_advisory_unlock_all()", prepare=False)
        self._holds_advisory_locks = False

    def commit(self) -> None:
        try:
            self._end("COMMIT")
        except psycopg.Error as exc:
            raise_translated(exc)
            raise

    def rollback(self) -> None:
        self._end("ROLLBACK")
