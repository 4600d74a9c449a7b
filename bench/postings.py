"""Posting throughput of the ledger core against pgbench on the same PostgreSQL, in the same run.

    .venv/bin/python bench/postings.py [--seconds 15] [--clients 8] [--accounts 1000] [--kind transfer|credit]

Baseline: pgbench's built-in TPC-B-like script (`-b tpcb-like`, SERIALIZABLE like us: 5 statements, 3
UPDATEs and an INSERT per transaction) with the same number of clients for the same time. Ours: random
transfers between `--accounts` funded accounts through `LedgerService.execute` (SERIALIZABLE, idempotency
claim, row locks in id order, entries, balances, outbox, retries), one thread per client. `--kind credit`
posts credits instead: every one of them also writes the tenant's single external USD account, so they queue
on it (pgbench's hot spot is its 10 branch rows). Prints both rates and their ratio; both run in fresh
databases that are dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.adapters.postgres.migrate import migrate
from core.application.commands import CreateAccount, Credit, Transfer
from core.application.retry import RetryCounter, RetryPolicy
from core.bootstrap import bootstrap
from core.domain.model import OverdraftPolicy
from core.domain.money import Money
from core.logs import configure_logging
from core.settings import Settings

ADMIN_URL = os.environ.get("CLEANLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def create_db(name: str) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)


def drop_db(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def pgbench(seconds: int, clients: int) -> float:
    name = f"bench_pgbench_{uuid.uuid4().hex[:8]}"
    url = create_db(name)
    try:
        subprocess.run(["pgbench", "-i", "-q", "-s", "10", url], check=True, capture_output=True)
        out = subprocess.run(
            [
                "pgbench",
                "-b",
                "tpcb-like",
                "-c",
                str(clients),
                "-j",
                str(min(clients, 2)),
                "-T",
                str(seconds),
                "-M",
                "prepared",
                "--max-tries=100",
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PGOPTIONS": "-c default_transaction_isolation=serializable"},
        ).stdout
        match = re.search(r"tps = ([\d.]+)", out)
        assert match, out
        return float(match.group(1))
    finally:
        drop_db(name)


def ledger(seconds: int, clients: int, accounts: int, kind: str) -> tuple[float, int, int]:
    name = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(database_url=create_db(name), log_level="WARNING")
    try:
        migrate(settings)
        counter = RetryCounter()
        service = bootstrap(settings, pool_size=clients + 1, retry=RetryPolicy(max_attempts=50, counter=counter))
        ids = []
        for _ in range(accounts):
            created = service.execute(
                CreateAccount("bench", "USD", OverdraftPolicy(0)), idempotency_key=uuid.uuid4().hex
            )
            assert created.result is not None
            account_id = uuid.UUID(created.result["account"]["id"])
            service.execute(
                Credit("bench", account_id, Money.for_posting(10**9, "USD")), idempotency_key=uuid.uuid4().hex
            )
            ids.append(account_id)
        done = [0] * clients
        deadline = time.perf_counter() + seconds

        def client(n: int) -> None:
            rng = random.Random(n)
            while time.perf_counter() < deadline:
                amount = Money.for_posting(rng.randint(1, 1000), "USD")
                src, dst = rng.sample(ids, 2)
                command = Transfer("bench", src, dst, amount) if kind == "transfer" else Credit("bench", dst, amount)
                service.execute(command, idempotency_key=uuid.uuid4().hex)
                done[n] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        service.close()
        return sum(done) / elapsed, sum(done), counter.retries
    finally:
        drop_db(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--kind", choices=["transfer", "credit"], default="transfer")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    baseline = pgbench(args.seconds, args.clients)
    rate, postings, retries = ledger(args.seconds, args.clients, args.accounts, args.kind)
    print(f"pgbench tpcb-like (serializable): {baseline:,.0f} tps  clients={args.clients} seconds={args.seconds}")
    print(
        f"ledger {args.kind + 's:':26}{rate:,.0f} postings/s  ({postings} postings, {retries} retries,"
        f" {args.accounts} accounts)"
    )
    print(f"ratio ledger/pgbench:             {rate / baseline:.2f}")


if __name__ == "__main__":
    main()
