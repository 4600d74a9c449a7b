"""Read side on PostgreSQL: balances in O(1) from the stored balance, entries by keyset pagination."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import IsolationLevel, sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from core.adapters.postgres.uow import (
    ACCOUNT_COLUMNS,
    HOLD_COLUMNS,
    TRANSACTION_COLUMNS,
    account_from_row,
    hold_from_row,
    operation_from_row,
    transactions_from_rows,
)
from core.application.ports import (
    AccountFilters,
    AccountPage,
    EntryPage,
    EntryView,
    LedgerQueries,
    OperationPage,
    TransactionFilters,
    TransactionPage,
    listing_digest,
)
from core.application.views import OperationResult
from core.domain.errors import AccountNotFound, RequestInvalid
from core.domain.model import Account, Hold, Transaction

# Largest page a reader may ask for, in entries.
MAX_PAGE_SIZE = 1000


def encode_cursor(created_at: datetime, sequence: int) -> str:
    raw = f"{created_at.isoformat()}|{sequence}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, sequence = raw.partition("|")
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at, int(sequence)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise RequestInvalid("cursor is not one this API returned") from None


def ledger_id(pool: ConnectionPool) -> str:
    """This database's identity (migration 0007)."""
    with pool.connection() as conn:
        row = conn.execute("SELECT id FROM ledger_instance").fetchone()
    if row is None:  # pragma: no cover - migration 0007 inserts the row
        raise RuntimeError("ledger_instance is empty: run `cleanledger migrate`")
    return str(row[0])


# Pending holds past their expiry, through holds_expiry_idx (pending holds with an expiry, and nothing else).
DUE_HOLDS = (
    "SELECT tenant_id, id, now() FROM holds WHERE status = 'pending' AND expires_at IS NOT NULL"
    " AND expires_at <= now() ORDER BY expires_at LIMIT %s"
)
# One hold of one tenant, as it stands.
HOLD = f"SELECT {HOLD_COLUMNS} FROM holds WHERE tenant_id = %s AND id = %s"
# One account of one tenant, as it stands.
ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = %s AND tenant_id = %s"


def keyset_page(
    select: str,
    *,
    alias: str,
    tenant_id: str,
    filters: Sequence[tuple[str, str, object | None]],
    order: tuple[str, str],
    newest_first: bool,
    digest: str,
    limit: int,
    cursor: str | None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[sql.Composed, dict[str, object]]:
    """One page of a tenant's listing, keyset-paginated on `order` (a time column and an id column): `select`
    ends with `WHERE` on the table `alias`; each filter is (parameter name, condition on it, value), left out
    when its value is None. One row more than `limit`, to tell whether another page follows."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise RequestInvalid(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    if since and until and since >= until:
        raise RequestInvalid("'since' must be before 'until'")
    time_column, id_column = order
    conditions = [sql.SQL(f"{alias}.tenant_id = %(tenant)s")]
    params: dict[str, object] = {"tenant": tenant_id, "limit": limit + 1}
    windows = [("since", f"{time_column} >= %(since)s", since), ("until", f"{time_column} < %(until)s", until)]
    for name, condition, value in [*filters, *windows]:
        if value is not None:
            conditions.append(sql.SQL(condition))  # constant SQL of this module, values as parameters
            params[name] = value
    if cursor is not None:
        params["c_time"], params["c_id"] = decode_keyset_cursor(cursor, digest)
        comparison = "<" if newest_first else ">"
        conditions.append(sql.SQL(f"({time_column}, {id_column}) {comparison} (%(c_time)s, %(c_id)s)"))
    direction = "DESC" if newest_first else "ASC"
    ordering = f" ORDER BY {time_column} {direction}, {id_column} {direction} LIMIT %(limit)s"
    query = sql.SQL(select + " {where}" + ordering).format(where=sql.SQL(" AND ").join(conditions))
    return query, params


# An account's posted balance at a moment: the `balance_after` of its last entry by then, one descent of
# entries_account_time_idx (O(log n) however long the history). No entry by then: 0.
BALANCE_AS_OF = (
    "SELECT coalesce((SELECT e.balance_after FROM entries e"
    " WHERE e.tenant_id = a.tenant_id AND e.account_id = a.id AND e.created_at <= %(at)s"
    " ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1), 0)"
    " FROM accounts a WHERE a.id = %(account)s AND a.tenant_id = %(tenant)s"
)
# The closing balance of each bucket (hour or day, in UTC) from `since` to `until`: one descent per bucket.
BALANCE_HISTORY = (
    "SELECT b.start, coalesce(last.balance_after, 0) FROM accounts a"
    " CROSS JOIN generate_series(date_trunc(%(unit)s, %(since)s::timestamptz, 'UTC'), %(until)s::timestamptz - interval"
    " '1 microsecond', ('1 ' || %(unit)s)::interval) AS b(start)"
    " LEFT JOIN LATERAL (SELECT e.balance_after FROM entries e WHERE e.tenant_id = a.tenant_id AND e.account_id = a.id"
    "   AND e.created_at < b.start + ('1 ' || %(unit)s)::interval"
    "   ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1) last ON true"
    " WHERE a.id = %(account)s AND a.tenant_id = %(tenant)s ORDER BY b.start"
)
# Buckets one balance-history answer may hold at most.
MAX_BUCKETS = 1000


def metadata_json(pairs: Sequence[tuple[str, str]]) -> str | None:
    """`metadata[key]=value` filters as the jsonb a containment (`@>`) test takes; None without any."""
    return json.dumps(dict(pairs)) if pairs else None


def accounts_query(
    tenant_id: str, filters: AccountFilters, *, limit: int, cursor: str | None
) -> tuple[sql.Composed, dict[str, object]]:
    """A page of the tenant's accounts on `accounts_tenant_created_idx` (metadata on `accounts_metadata_idx`)."""
    return keyset_page(
        f"SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE",
        alias="a",
        tenant_id=tenant_id,
        filters=[
            ("currency", "a.currency = %(currency)s", filters.currency),
            ("status", "a.status = %(status)s", filters.status),
            ("metadata", "a.metadata @> %(metadata)s::jsonb", metadata_json(filters.metadata)),
        ],
        order=("a.created_at", "a.id"),
        newest_first=filters.newest_first,
        digest=filters.digest(tenant_id),
        limit=limit,
        cursor=cursor,
    )


def transactions_query(
    tenant_id: str, filters: TransactionFilters, *, limit: int, cursor: str | None
) -> tuple[sql.Composed, dict[str, object]]:
    """A page of the tenant's transactions (ids and times), on `transactions_tenant_created_idx`, metadata on
    `transactions_metadata_idx`, an account's through `entries_account_time_idx`."""
    by_account = (
        "t.id IN (SELECT e.transaction_id FROM entries e WHERE e.tenant_id = %(tenant)s AND e.account_id = %(account)s)"
    )
    return keyset_page(
        "SELECT t.id, t.created_at FROM transactions t WHERE",
        alias="t",
        tenant_id=tenant_id,
        filters=[
            ("account", by_account, filters.account_id),
            ("kind", "t.kind = %(kind)s", filters.kind),
            ("metadata", "t.metadata @> %(metadata)s::jsonb", metadata_json(filters.metadata)),
        ],
        order=("t.created_at", "t.id"),
        newest_first=filters.newest_first,
        digest=filters.digest(tenant_id),
        limit=limit,
        cursor=cursor,
        since=filters.since,
        until=filters.until,
    )


# The transactions of a page with their entries and operations, in the page's order.
TRANSACTIONS = (
    f"SELECT {TRANSACTION_COLUMNS} FROM transactions t JOIN entries e ON e.transaction_id = t.id"
    " WHERE t.id = ANY(%s) AND t.tenant_id = %s ORDER BY e.account_id, e.sequence"
)


def operations_query(
    tenant_id: str,
    *,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    cursor: str | None,
) -> tuple[sql.Composed, dict[str, object], str]:
    """A page of the tenant's operations, oldest first, on `idempotency_keys_tenant_created_idx`; and the
    listing's digest, which its cursors carry."""
    digest = listing_digest(tenant_id, "operations", status, since, until)
    query, params = keyset_page(
        "SELECT k.operation_id, k.status, k.response, k.created_at FROM idempotency_keys k WHERE",
        alias="k",
        tenant_id=tenant_id,
        filters=[("status", "k.status = %(status)s", status)],
        order=("k.created_at", "k.operation_id"),
        newest_first=False,
        digest=digest,
        limit=limit,
        cursor=cursor,
        since=since,
        until=until,
    )
    return query, params, digest


def encode_keyset_cursor(digest: str, created_at: datetime, row_id: UUID) -> str:
    raw = json.dumps({"f": digest, "t": created_at.isoformat(), "id": str(row_id)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_keyset_cursor(cursor: str, digest: str) -> tuple[datetime, UUID]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position = datetime.fromisoformat(raw["t"]), UUID(raw["id"])
        belongs = raw["f"] == digest
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise RequestInvalid("cursor is not one this API returned") from None
    if not belongs:
        raise RequestInvalid("this cursor belongs to another listing: same filters and order, same API key")
    return position


# One operation of one tenant, pending or settled.
OPERATION = (
    "SELECT k.operation_id, k.status, k.response FROM idempotency_keys k WHERE k.operation_id = %s AND k.tenant_id = %s"
)
# Whether the page's account belongs to the tenant (asked in the page's snapshot).
ACCOUNT_OWNER = "SELECT 1 FROM accounts WHERE id = %(account)s AND tenant_id = %(tenant)s"


@dataclass(frozen=True, slots=True)
class EntriesQuery:
    """A page of entries as SQL: the owner check, then the page (one row more than the limit: `has_more`)."""

    query: sql.Composed
    params: dict[str, object]
    limit: int

    def page(self, rows: Sequence[Sequence[Any]]) -> EntryPage:
        views = [EntryView(*row) for row in rows[: self.limit]]
        more = len(rows) > self.limit
        return EntryPage(views, encode_cursor(views[-1].created_at, views[-1].sequence) if more else None)


def entries_query(
    tenant_id: str,
    account_id: UUID,
    *,
    limit: int,
    cursor: str | None,
    newest_first: bool,
    since: datetime | None,
    until: datetime | None,
) -> EntriesQuery:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise RequestInvalid(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    if since and until and since >= until:
        raise RequestInvalid("'since' must be before 'until'")
    conditions: list[sql.Composable] = [sql.SQL("e.tenant_id = %(tenant)s AND e.account_id = %(account)s")]
    params: dict[str, object] = {"account": account_id, "tenant": tenant_id, "limit": limit + 1}
    if since is not None:
        conditions.append(sql.SQL("e.created_at >= %(since)s"))
        params["since"] = since
    if until is not None:
        conditions.append(sql.SQL("e.created_at < %(until)s"))
        params["until"] = until
    if cursor is not None:
        params["c_time"], params["c_seq"] = decode_cursor(cursor)
        conditions.append(
            sql.SQL("(e.created_at, e.sequence) {} (%(c_time)s, %(c_seq)s)").format(
                sql.SQL("<" if newest_first else ">")
            )
        )
    direction = sql.SQL("DESC" if newest_first else "ASC")
    query = sql.SQL(
        "SELECT e.transaction_id, t.kind, e.account_id, e.amount, e.currency, e.sequence,"
        " e.balance_after, e.created_at"
        " FROM entries e JOIN transactions t ON t.id = e.transaction_id"
        " WHERE {where}"
        " ORDER BY e.created_at {dir}, e.sequence {dir} LIMIT %(limit)s"
    ).format(where=sql.SQL(" AND ").join(conditions), dir=direction)
    return EntriesQuery(query, params, limit)


def not_found(account_id: UUID) -> AccountNotFound:
    return AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))


class PostgresQueries(LedgerQueries):
    """Blocking reads, for the CLI, the tests and the workers."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def due_holds(self, *, limit: int) -> list[tuple[str, UUID, datetime]]:
        """Pending holds past their expiry, the longest overdue first: (tenant, hold id, the database's now)."""
        with self.pool.connection() as conn:
            return [(row[0], row[1], row[2]) for row in conn.execute(DUE_HOLDS, (limit,)).fetchall()]

    def account(self, tenant_id: str, account_id: UUID) -> Account | None:
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.READ_COMMITTED
            row = conn.execute(ACCOUNT, (account_id, tenant_id)).fetchone()
        return account_from_row(row) if row else None

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
        page = entries_query(
            tenant_id, account_id, limit=limit, cursor=cursor, newest_first=newest_first, since=since, until=until
        )
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ  # the account check and page agree
            if conn.execute(ACCOUNT_OWNER, page.params).fetchone() is None:
                raise not_found(account_id)
            return page.page(conn.execute(page.query, page.params).fetchall())

    def operation(self, tenant_id: str, operation_id: UUID) -> OperationResult | None:
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.READ_COMMITTED
            row = conn.execute(OPERATION, (operation_id, tenant_id)).fetchone()
        return operation_from_row(*row) if row else None


class AsyncPostgresQueries:
    """The same reads on the ingress's event loop (its autocommit asyncio pool), no thread hop."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def account(self, tenant_id: str, account_id: UUID) -> Account | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(ACCOUNT, (account_id, tenant_id))).fetchone()
        return account_from_row(row) if row else None

    async def accounts(
        self, tenant_id: str, filters: AccountFilters, *, limit: int, cursor: str | None = None
    ) -> AccountPage:
        query, params = accounts_query(tenant_id, filters, limit=limit, cursor=cursor)
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, params)).fetchall()
        accounts = [account_from_row(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:  # the last shown account is where the next page starts
            last = accounts[-1]
            assert last.created_at is not None  # a stored account has its time
            next_cursor = encode_keyset_cursor(filters.digest(tenant_id), last.created_at, last.id)
        return AccountPage(accounts, next_cursor)

    async def hold(self, tenant_id: str, hold_id: UUID) -> Hold | None:
        """The tenant's hold, as it stands."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(HOLD, (tenant_id, hold_id))).fetchone()
        return None if row is None else hold_from_row(row)

    async def transaction(self, tenant_id: str, transaction_id: UUID) -> tuple[Transaction, UUID] | None:
        """The tenant's transaction with its entries, and the operation that posted it."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(TRANSACTIONS, ([transaction_id], tenant_id))).fetchall()
        found = transactions_from_rows(rows)
        return found[0] if found else None

    async def transactions(
        self, tenant_id: str, filters: TransactionFilters, *, limit: int, cursor: str | None = None
    ) -> TransactionPage:
        query, params = transactions_query(tenant_id, filters, limit=limit, cursor=cursor)
        async with self.pool.connection() as conn:
            page = await (await conn.execute(query, params)).fetchall()
            shown = page[:limit]
            rows = await (await conn.execute(TRANSACTIONS, ([row[0] for row in shown], tenant_id))).fetchall()
        by_id = {transaction.id: (transaction, operation) for transaction, operation in transactions_from_rows(rows)}
        next_cursor = None
        if len(page) > limit:
            next_cursor = encode_keyset_cursor(filters.digest(tenant_id), shown[-1][1], shown[-1][0])
        return TransactionPage([by_id[row[0]] for row in shown if row[0] in by_id], next_cursor)

    async def operations(
        self,
        tenant_id: str,
        *,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int,
        cursor: str | None = None,
    ) -> OperationPage:
        query, params, digest = operations_query(
            tenant_id, status=status, since=since, until=until, limit=limit, cursor=cursor
        )
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, params)).fetchall()
        page = [(operation_from_row(op_id, state, response), created_at) for op_id, state, response, created_at in rows]
        shown = page[:limit]
        next_cursor = None
        if len(page) > limit:
            last, created_at = shown[-1]
            next_cursor = encode_keyset_cursor(digest, created_at, last.operation_id)
        return OperationPage([(operation, created_at) for operation, created_at in shown], next_cursor)

    async def balance_as_of(self, tenant_id: str, account_id: UUID, at: datetime) -> int | None:
        """The account's posted balance at `at` (None: no such account of the tenant)."""
        params = {"account": account_id, "tenant": tenant_id, "at": at}
        async with self.pool.connection() as conn:
            row = await (await conn.execute(BALANCE_AS_OF, params)).fetchone()
        return int(row[0]) if row else None

    async def balance_history(
        self, tenant_id: str, account_id: UUID, *, unit: str, since: datetime, until: datetime
    ) -> list[tuple[datetime, int]] | None:
        """(bucket start, closing balance) per `unit` ("hour" or "day") from `since` to `until`; None: no such
        account of the tenant."""
        if unit not in ("hour", "day"):
            raise RequestInvalid("interval is hour or day")
        if since >= until:
            raise RequestInvalid("'since' must be before 'until'")
        if (until - since).total_seconds() / (3600 if unit == "hour" else 86400) > MAX_BUCKETS:
            raise RequestInvalid(f"at most {MAX_BUCKETS} {unit}s at once")
        params = {"account": account_id, "tenant": tenant_id, "unit": unit, "since": since, "until": until}
        async with self.pool.connection() as conn:
            owner = await (await conn.execute(ACCOUNT_OWNER, params)).fetchone()
            if owner is None:
                return None
            rows = await (await conn.execute(BALANCE_HISTORY, params)).fetchall()
        return [(start, int(balance)) for start, balance in rows]

    async def entries(
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
        page = entries_query(
            tenant_id, account_id, limit=limit, cursor=cursor, newest_first=newest_first, since=since, until=until
        )
        # One REPEATABLE READ transaction: the owner check and the page see the same snapshot.
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if await (await conn.execute(ACCOUNT_OWNER, page.params)).fetchone() is None:
                raise not_found(account_id)
            return page.page(await (await conn.execute(page.query, page.params)).fetchall())
