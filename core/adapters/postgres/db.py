"""The one place that opens PostgreSQL connections."""

from __future__ import annotations

import orjson
from psycopg import Connection
from psycopg.rows import TupleRow
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from core.settings import Settings

# json/jsonb columns (metadata, stored outcomes) are parsed by orjson: several times faster than the standard
# library on the posting path, which reads every locked account's metadata.
set_json_loads(orjson.loads)

# An administration connection waits this many times a request's lock timeout for a lock.
ADMIN_LOCK_TIMEOUT_FACTOR = 10
PREPARE_THRESHOLD = 5  # executions of a query before psycopg prepares it server-side (its default)


def connect_kwargs(settings: Settings) -> dict[str, object]:
    return {
        "autocommit": False,
        "options": (
            f"-c statement_timeout={settings.db_statement_timeout_ms} -c lock_timeout={settings.db_lock_timeout_ms}"
            f" -c idle_in_transaction_session_timeout={settings.db_idle_in_transaction_timeout_ms}"
        ),
        "application_name": "cleanledger",
    }


def reset_session(conn: Connection[TupleRow]) -> None:
    """Back to the defaults when a connection returns to the pool: a unit of work's settings must not
    leak into the next borrower's plain reads."""
    conn.autocommit = False  # a unit of work runs its own BEGIN/COMMIT in autocommit
    conn.prepare_threshold = PREPARE_THRESHOLD
    conn.isolation_level = None
    conn.read_only = None


def open_pool(
    settings: Settings, *, min_size: int | None = None, max_size: int | None = None, open_timeout_s: float = 30.0
) -> ConnectionPool:
    """A connection pool, opened and waited for (up to `open_timeout_s` seconds) so a bad URL fails at
    start-up, not on first use."""
    pool: ConnectionPool = ConnectionPool(
        settings.database_url,
        min_size=settings.db_pool_min if min_size is None else min_size,
        max_size=settings.db_pool_max if max_size is None else max_size,
        kwargs=connect_kwargs(settings),
        reset=reset_session,
        open=False,
        name="cleanledger",
    )
    pool.open(wait=True, timeout=open_timeout_s)
    return pool


async def open_async_pool(settings: Settings, *, max_size: int) -> AsyncConnectionPool:
    """An asyncio pool for the ingress, in autocommit: each statement is its own transaction and commit (the
    ingress writes one statement per group of requests and never holds a transaction open)."""
    kwargs = connect_kwargs(settings)
    kwargs["autocommit"] = True
    pool: AsyncConnectionPool = AsyncConnectionPool(
        settings.database_url,
        min_size=min(2, max_size),
        max_size=max_size,
        kwargs=kwargs,
        open=False,
        name="cleanledger-async",
    )
    await pool.open(wait=True, timeout=30)
    return pool


def connect(
    settings: Settings, *, autocommit: bool = True, admin: bool = False, connect_timeout_s: float | None = None
) -> Connection[TupleRow]:
    """A single connection, for CLI commands and tests. `admin` (migrate, verify): no statement or idle
    timeout, since a migration or a full check of a real-sized ledger outlasts a request's 5 s by far."""
    kwargs = connect_kwargs(settings)
    kwargs["autocommit"] = autocommit
    if admin:
        # Locks are still waited for only so long: a migration must not queue behind a stuck session forever.
        lock_timeout_ms = settings.db_lock_timeout_ms * ADMIN_LOCK_TIMEOUT_FACTOR
        kwargs["options"] = (
            f"-c statement_timeout=0 -c idle_in_transaction_session_timeout=0 -c lock_timeout={lock_timeout_ms}"
        )
    if connect_timeout_s is not None:
        kwargs["connect_timeout"] = max(1, round(connect_timeout_s))  # libpq counts whole seconds
    return Connection.connect(settings.database_url, **kwargs)  # type: ignore[arg-type]


# Accounts a unit may read before PostgreSQL's predicate locks on them merge into one lock on the whole table:
# a batch's 1,000 transfers read up to 2,000 of them, on as many pages.
PREDICATE_LOCK_PAGES_NEEDED = 4096


def predicate_lock_pages(pool: ConnectionPool) -> int:
    """How many pages of one table a SERIALIZABLE transaction may hold predicate locks on before they become one
    lock on the table (`max_pred_locks_per_relation`, or a share of `max_pred_locks_per_transaction` when it is
    negative). Past it, a batch's reads conflict with every concurrent posting, and a batch among steady
    transfers is refused again and again (bench/mixed.py)."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT current_setting('max_pred_locks_per_relation')::int,"
            " current_setting('max_pred_locks_per_transaction')::int"
        ).fetchone()
    assert row is not None
    per_relation, per_transaction = int(row[0]), int(row[1])
    return per_relation if per_relation >= 0 else per_transaction // -per_relation
