"""Reads that must not grow with an account's history: one account's entries loaded by COPY to 10^3, 10^4 ...
10^7, and at each size the reads of the HTTP API timed through the adapter the ingress uses
(`AsyncPostgresQueries`):

    .venv/bin/python bench/history.py [--max-entries 10000000] [--repeat 200]

- balance as of a moment (`GET /v1/accounts/{id}/balance?as_of=`): a random moment of the history;
- balance history (`GET /v1/accounts/{id}/balance-history?interval=day`): the closing balance of 30 days;
- the first page of entries (100, newest first), and a page deep in history (100 before a moment 1% into it,
  or 200 entries in at the smallest sizes, so that the page is full).

A scratch database, migrated, dropped after. Entries are one second apart, one per transaction (amount 1, so
`balance_after` is the sequence), with their transactions (the page joins them); the balancing legs are left out,
as no read measured touches them, and so are the transaction listing's indexes, which they do not use either:
both only slow the load. Reported per size: p50 and p99 milliseconds of each read, and its p50 over the p50 at
10^3 entries ("flat" is about 1). Results go to bench/results/history-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import fresh_database, machine_facts, print_machine, run_started, write_results

from core.adapters.postgres.db import open_async_pool
from core.adapters.postgres.migrate import migrate
from core.adapters.postgres.queries import AsyncPostgresQueries
from core.settings import Settings

TENANT = "history"
START = datetime(2020, 1, 1, tzinfo=UTC)
PAGE = 100
COPY_CHUNK = 100_000  # rows written to COPY per call
# Ids that grow with the row, so each B-tree takes its rows at its right edge as in production (UUIDv7).
ID_BASE = uuid.uuid4().int & ~((1 << 64) - 1)


def row_id(kind: int, n: int) -> str:
    return str(uuid.UUID(int=ID_BASE | (kind << 48) | n))


def load(conn: psycopg.Connection[Any], account: uuid.UUID, first: int, last: int) -> None:
    """Entries `first`..`last` (sequence numbers) of the account, and their transactions, by COPY."""
    with conn.cursor() as cur:
        for table, columns, line in (
            (
                "transactions",
                "(id, tenant_id, kind, operation_id, created_at)",
                lambda n, at: f"{row_id(1, n)}\t{TENANT}\tcredit\t{row_id(2, n)}\t{at}\n",
            ),
            (
                "entries",
                "(transaction_id, tenant_id, account_id, sequence, amount, currency, balance_after, created_at)",
                lambda n, at: f"{row_id(1, n)}\t{TENANT}\t{account}\t{n}\t1\tUSD\t{n}\t{at}\n",
            ),
        ):
            with cur.copy(f"COPY {table} {columns} FROM STDIN") as copy:
                for start in range(first, last + 1, COPY_CHUNK):
                    chunk = range(start, min(last, start + COPY_CHUNK - 1) + 1)
                    copy.write("".join(line(n, (START + timedelta(seconds=n)).isoformat()) for n in chunk))
    conn.execute(
        "UPDATE accounts SET posted_balance = %s, version = %s WHERE tenant_id = %s AND id = %s",
        (last, last, TENANT, account),
    )
    conn.commit()
    conn.execute("ANALYZE entries")
    conn.execute("ANALYZE transactions")
    conn.commit()


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    for _ in range(5):  # warm the caches and the pool
        await call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1]}


async def measure(settings: Settings, account: uuid.UUID, size: int, repeat: int) -> dict[str, dict[str, float]]:
    pool = await open_async_pool(settings, max_size=1)
    queries = AsyncPostgresQueries(pool)
    end = START + timedelta(seconds=size)
    deep = START + timedelta(seconds=max(2 * PAGE, size // 100))  # a full page before it, at every size
    rng = random.Random(size)
    try:
        page = await queries.entries(TENANT, account, limit=PAGE)
        assert len(page.entries) == PAGE, "a full first page"
        assert page.entries[0].sequence == size, "the newest entry comes first"
        deep_page = await queries.entries(TENANT, account, limit=PAGE, until=deep)
        assert deep_page.entries, "a page deep in history"
        assert deep_page.entries[0].created_at < deep
        as_of = await queries.balance_as_of(TENANT, account, end)
        assert as_of == size, f"balance as of the end is {as_of}, not {size}"

        async def balance_as_of() -> None:
            await queries.balance_as_of(TENANT, account, START + timedelta(seconds=rng.randint(1, size)))

        async def balance_history() -> None:
            await queries.balance_history(TENANT, account, unit="day", since=end - timedelta(days=30), until=end)

        async def first_page() -> None:
            await queries.entries(TENANT, account, limit=PAGE)

        async def deep_in_history() -> None:
            await queries.entries(TENANT, account, limit=PAGE, until=deep)

        return {
            "balance_as_of": await timed(balance_as_of, repeat),
            "balance_history_30_days": await timed(balance_history, repeat),
            "entries_first_page": await timed(first_page, repeat),
            "entries_deep_page": await timed(deep_in_history, repeat),
        }
    finally:
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--max-entries", type=int, default=10**7, help="the largest history (a power of ten)")
    parser.add_argument("--repeat", type=int, default=200, help="timed calls of each read per size")
    args = parser.parse_args()
    started = run_started()
    facts = machine_facts()
    print_machine(facts)
    sizes = [10**k for k in range(3, 20) if 10**k <= args.max_entries]
    figures: dict[str, Any] = {"sizes": {}, "load_seconds": {}}
    with fresh_database("bench_history") as url:
        settings = Settings.from_env(database_url=url, log_level="WARNING")
        migrate(settings)
        account = uuid.uuid4()
        with psycopg.connect(url) as conn:
            # Not read by anything measured, and only slowing the load: the transaction listing's indexes and
            # the foreign keys' per-row checks (the rows are consistent by construction).
            conn.execute("DROP INDEX IF EXISTS transactions_metadata_idx, transactions_tenant_created_idx")
            conn.execute("ALTER TABLE entries DISABLE TRIGGER ALL")
            conn.execute(
                "INSERT INTO accounts (id, tenant_id, currency, kind, overdraft_limit) VALUES (%s, %s, 'USD',"
                " 'customer', 0)",
                (account, TENANT),
            )
            conn.commit()
            loaded = 0
            for size in sizes:
                begun = time.perf_counter()
                load(conn, account, loaded + 1, size)
                loaded = size
                figures["load_seconds"][size] = round(time.perf_counter() - begun, 1)
                figures["sizes"][size] = asyncio.run(measure(settings, account, size, args.repeat))
                shown = ", ".join(
                    f"{read} {t['p50_ms']:.2f} / {t['p99_ms']:.2f}" for read, t in figures["sizes"][size].items()
                )
                print(f"{size:>12,} entries (loaded in {figures['load_seconds'][size]} s): p50 / p99 ms: {shown}")
    smallest = figures["sizes"][sizes[0]]
    ratios = {
        f"{read}_p50_at_{size}/at_{sizes[0]}": round(
            figures["sizes"][size][read]["p50_ms"] / smallest[read]["p50_ms"], 2
        )
        for size in sizes[1:]
        for read in smallest
    }
    for name, value in ratios.items():
        print(f"ratio {name} {value}")
    write_results(
        "history",
        machine=facts,
        parameters={"sizes": sizes, "repeat": args.repeat, "page": PAGE},
        figures=figures,
        ratios=ratios,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
