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


def open_pool(settings: Settings, *, min_size: int | None = None, max_size: int | None = None) -> ConnectionPool:
    """A connection pool, opened and waited for so a bad URL fails at start-up, not on first use."""
    pool: ConnectionPool = ConnectionPool(
        settings.database_url,
        min_size=settings.db_pool_min if min_size is None else min_size,
        max_size=settings.db_pool_max if max_size is None else max_size,
        kwargs=connect_kwargs(settings),
        reset=reset_session,
        open=False,
        name="cleanledger",
    )
    pool.open(wait=True, timeout=30)
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


def connect(settings: Settings, *, autocommit: bool = True) -> Connection[TupleRow]:
    """A single connection, for CLI commands (migrate, verify) and tests."""
    kwargs = connect_kwargs(settings)
    kwargs["autocommit"] = autocommit
    return Connection.connect(settings.database_url, **kwargs)  # type: ignore[arg-type]
