"""Batches among single postings: does a 1,000-transfer batch still settle while transfers stream in beside it?

    .venv/bin/python bench/mixed.py [--seconds 10] [--threads 4] [--accounts 10000]

On a fresh, migrated database, through the engine (`LedgerService`, the workers' settle path, no HTTP), with
`--accounts` accounts: `--threads` threads post single transfers between accounts of one half for `--seconds`,
first alone, then while one more thread settles batches of 1,000 transfers between accounts of the other half.
The two halves share no account, so every conflict is one SERIALIZABLE sees in its predicate locks, not one in the
books. Reported per part: single transfers settled, serialization retries (of singles and of batch groups), groups
given up after their retries, batches settled; and the server's predicate-lock budget
(`max_pred_locks_per_transaction`, `max_pred_locks_per_relation`). A batch reads 2,000 accounts: on the default
budget those reads become one lock on the whole table, and the streaming transfers keep breaking it. Results go
to bench/results/mixed-<UTC>.json; exits 1 if a group was given up.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fresh_database, machine_facts, print_machine, run_started, write_results

from core.adapters.postgres.migrate import migrate
from core.application.commands import MAX_BATCH_ITEMS, Batch, CreateAccount, Transfer
from core.application.ports import Submission
from core.bootstrap import LedgerService, bootstrap
from core.domain.ids import new_id
from core.domain.model import OverdraftPolicy
from core.domain.money import Money
from core.settings import Settings

TENANT = "mixed"
ONE_CENT = Money.for_posting(1, "USD")


def open_accounts(ledger: LedgerService, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    for start in range(0, count, MAX_BATCH_ITEMS):
        items = tuple(CreateAccount(TENANT, "USD", OverdraftPolicy(10**12), {}, i) for i in ids[start : start + 1000])
        ledger.execute(Batch(TENANT, items), idempotency_key=uuid.uuid4().hex)
    return ids


def run_part(
    ledger: LedgerService, singles: list[uuid.UUID], batched: list[uuid.UUID] | None, args: Any
) -> dict[str, int]:
    stop = threading.Event()
    counts = {"singles": 0, "batches": 0, "given_up": 0}
    lock = threading.Lock()

    def single(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            a, b = rng.sample(singles, 2)
            ledger.execute(Transfer(TENANT, a, b, ONE_CENT), idempotency_key=uuid.uuid4().hex)
            with lock:
                counts["singles"] += 1

    def batches(accounts: list[uuid.UUID]) -> None:
        rng = random.Random(0)
        while not stop.is_set():
            pairs = (rng.sample(accounts, 2) for _ in range(MAX_BATCH_ITEMS))
            items = tuple(Transfer(TENANT, source, destination, ONE_CENT) for source, destination in pairs)
            [outcome] = ledger.settle_group([Submission(Batch(TENANT, items), uuid.uuid4().hex, new_id())])
            with lock:
                counts["batches" if getattr(outcome, "status", None) == "succeeded" else "given_up"] += 1

    before = (ledger.retry.counter.retries, ledger.retry.counter.exhausted)
    threads = [threading.Thread(target=single, args=(i,)) for i in range(args.threads)]
    if batched is not None:
        threads.append(threading.Thread(target=batches, args=(batched,)))
    for thread in threads:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    counts["retries"] = ledger.retry.counter.retries - before[0]
    counts["retries_exhausted"] = ledger.retry.counter.exhausted - before[1]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=4, help="threads posting single transfers")
    parser.add_argument("--accounts", type=int, default=10_000)
    args = parser.parse_args()
    started, machine = run_started(), machine_facts()
    print_machine(machine)
    with fresh_database("bench_mixed") as url:
        settings = Settings.from_env().replace(database_url=url)
        migrate(settings)
        with psycopg.connect(url) as conn:
            budget = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in ("max_pred_locks_per_transaction", "max_pred_locks_per_relation", "max_pred_locks_per_page")
            }
        print(f"predicate-lock budget: {budget}")
        ledger = bootstrap(settings, pool_size=args.threads + 2)
        try:
            ids = open_accounts(ledger, args.accounts)
            half = len(ids) // 2
            parts = {
                "alone": run_part(ledger, ids[:half], None, args),
                "with_batches": run_part(ledger, ids[:half], ids[half:], args),
            }
        finally:
            ledger.close()
    for name, counts in parts.items():
        print(f"{name:13} {counts}")
    ok = parts["with_batches"]["given_up"] == 0 and parts["with_batches"]["retries_exhausted"] == 0
    write_results(
        "mixed",
        started=started,
        machine=machine,
        parameters=vars(args),
        figures={"predicate_lock_budget": budget, **parts},
        ratios={},
        checks={"no_group_given_up": ok},
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
