"""The ledger engine without HTTP or queue, against the baselines measured on the same PostgreSQL in the same run.

    .venv/bin/python bench/postings.py [--seconds 20] [--clients 16] [--batch 256] [--accounts 10000]
                                       [--cases uniform,hot-credit,hot-transfer] [--no-tpcb]

First the baselines of bench/baseline.py with the same client count and seconds: pgbench tpcb-like (read
committed, scale max(16, clients)) and the plain-SQL `post_transfer` (uniform, hot). Then the engine: a fresh
ledger database (migrated), `bootstrap(settings, pool_size=clients + 2)`, `--accounts` accounts each funded
by one credit, and `--clients` threads that each call `LedgerService.execute_many` with `--batch` commands
(`execute` per command with `--batch 1`, or when `execute_many` does not exist) for `--seconds`:

- `uniform`: transfers between two random accounts of the `--accounts`;
- `hot-credit`: credits to random accounts; every credit also writes the tenant's one external account;
- `hot-transfer`: transfers from random accounts, all into one account.

Prints postings/s, serialization retries (the RetryPolicy's counter), CPU milliseconds per posting of this
process (time.process_time) and of the PostgreSQL server (its whole process tree, from /proc), and the ratios
to the baselines. `cleanledger verify`'s checks run on the ledger afterwards. All databases are fresh and
dropped afterwards; results go to bench/results/postings-<UTC>.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import describe, plain_sql, tpcb_like
from common import (
    CpuMeter,
    checkpoint,
    fresh_database,
    machine_facts,
    print_machine,
    ratio,
    run_started,
    server_roots,
    write_results,
)

from core.adapters.postgres.db import connect
from core.adapters.postgres.migrate import migrate
from core.adapters.postgres.verify import verify
from core.application.commands import Command, CreateAccount, Credit, Transfer
from core.application.retry import RetryCounter, RetryPolicy
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService, bootstrap
from core.domain.model import OverdraftPolicy
from core.domain.money import Money
from core.logs import configure_logging
from core.settings import Settings

TENANT = "bench"
CASES = ("uniform", "hot-credit", "hot-transfer")
OPENING_CREDIT = 10**9  # cents per account; transfers move 1..1000
Item = tuple[Command, str]
CommandMaker = Callable[[random.Random], Command]


@dataclass
class EngineResult:
    case: str
    postings: int
    seconds: float
    rate: float
    failed: int  # settled as failed (a business rule); none expected
    retries: int  # serialization conflicts retried by the RetryPolicy
    exhausted: int  # units whose retries ran out
    cpu_ms_per_posting: dict[str, float | None]  # self (this process), postgres, machine


def has_execute_many(service: LedgerService) -> bool:
    return callable(getattr(service, "execute_many", None))


def run_items(service: LedgerService, items: Sequence[Item], *, batched: bool) -> list[OperationResult]:
    """`execute_many` when asked and available, else `execute` one by one."""
    if batched:
        execute_many: Callable[[list[Item]], list[OperationResult]] = getattr(service, "execute_many")  # noqa: B009
        return execute_many(list(items))
    return [service.execute(command, idempotency_key=key) for command, key in items]


def key() -> str:
    return uuid.uuid4().hex


def open_accounts(service: LedgerService, *, accounts: int, clients: int, batch: int, batched: bool) -> list[uuid.UUID]:
    """`accounts` accounts (overdraft 0), each funded with one credit, created by `clients` threads."""

    def chunks(items: list[Item]) -> list[list[Item]]:
        size = batch if batched else max(1, len(items) // (clients * 4))
        return [items[i : i + size] for i in range(0, len(items), size)]

    def run_all(items: list[Item]) -> list[OperationResult]:
        with ThreadPoolExecutor(clients) as pool:
            return [
                r for part in pool.map(lambda c: run_items(service, c, batched=batched), chunks(items)) for r in part
            ]

    created = run_all([(CreateAccount(TENANT, "USD", OverdraftPolicy(0)), key()) for _ in range(accounts)])
    ids = [uuid.UUID(r.result["account"]["id"]) for r in created if r.result is not None]
    assert len(ids) == accounts, f"created {len(ids)} of {accounts} accounts"
    funded = run_all([(Credit(TENANT, i, Money.for_posting(OPENING_CREDIT, "USD")), key()) for i in ids])
    assert all(r.status is OperationStatus.SUCCEEDED for r in funded), "funding credits failed"
    return ids


def command_maker(case: str, ids: list[uuid.UUID]) -> CommandMaker:
    hot, others = ids[0], ids[1:]

    def uniform(rng: random.Random) -> Command:
        src, dst = rng.sample(ids, 2)
        return Transfer(TENANT, src, dst, Money.for_posting(rng.randint(1, 1000), "USD"))

    def hot_credit(rng: random.Random) -> Command:
        return Credit(TENANT, rng.choice(ids), Money.for_posting(rng.randint(1, 1000), "USD"))

    def hot_transfer(rng: random.Random) -> Command:
        return Transfer(TENANT, rng.choice(others), hot, Money.for_posting(rng.randint(1, 1000), "USD"))

    return {"uniform": uniform, "hot-credit": hot_credit, "hot-transfer": hot_transfer}[case]


def drive(
    service: LedgerService,
    counter: RetryCounter,
    case: str,
    make: CommandMaker,
    *,
    clients: int,
    batch: int,
    batched: bool,
    seconds: int,
) -> EngineResult:
    """`clients` threads submit batches of `batch` commands until `seconds` have passed; the time counted
    runs until the last batch returned."""
    done = [0] * clients
    failed = [0] * clients
    errors: list[BaseException] = []
    retries_before, exhausted_before = counter.retries, counter.exhausted
    meter = CpuMeter({"postgres": server_roots("postgres")})
    start_line = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        rng = random.Random(f"{case}-{n}")
        start_line.wait()
        try:
            while time.perf_counter() < deadline:
                items = [(make(rng), key()) for _ in range(batch)]
                results = run_items(service, items, batched=batched)
                done[n] += len(results)
                failed[n] += sum(1 for r in results if r.status is OperationStatus.FAILED)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,), name=f"bench-{n}") for n in range(clients)]
    for t in threads:
        t.start()
    meter.start()
    started = time.perf_counter()
    deadline = started + seconds
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    meter.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed in {case}") from errors[0]
    postings = sum(done)
    return EngineResult(
        case=case,
        postings=postings,
        seconds=elapsed,
        rate=postings / elapsed,
        failed=sum(failed),
        retries=counter.retries - retries_before,
        exhausted=counter.exhausted - exhausted_before,
        cpu_ms_per_posting=meter.per_operation(postings),
    )


def engine(
    *, clients: int, seconds: int, batch: int, accounts: int, cases: Sequence[str]
) -> tuple[dict[str, EngineResult], dict[str, Any]]:
    """The engine cases in one fresh ledger database; returns the results and facts about the run."""
    with fresh_database("bench_engine") as url:
        settings = Settings.from_env(database_url=url, log_level="WARNING")
        migrate(settings)
        counter = RetryCounter()
        service = bootstrap(settings, pool_size=clients + 2, retry=RetryPolicy(max_attempts=50, counter=counter))
        try:
            batched = batch > 1 and has_execute_many(service)
            setup_started = time.perf_counter()
            ids = open_accounts(service, accounts=accounts, clients=clients, batch=batch, batched=batched)
            setup_s = time.perf_counter() - setup_started
            print(f"engine: {accounts:,} accounts opened and funded in {setup_s:.1f} s")
            results = {}
            for case in cases:
                checkpoint(url)
                results[case] = drive(
                    service,
                    counter,
                    case,
                    command_maker(case, ids),
                    clients=clients,
                    batch=batch if batched else 1,
                    batched=batched,
                    seconds=seconds,
                )
                print(f"engine {case:12}: {results[case].rate:9,.0f} postings/s")
        finally:
            service.close()
        with connect(settings, autocommit=False) as conn:
            violations = verify(conn)
        facts = {
            "execute_many": has_execute_many(service),
            "batched": batched,
            "setup_seconds": setup_s,
            "verify_violations": [str(v) for v in violations],
        }
        return results, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="commands per execute_many call (1: execute)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--no-tpcb", action="store_true", help="skip the pgbench tpcb-like baseline")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    configure_logging(level="WARNING")
    started = run_started()
    machine = machine_facts()
    print_machine(machine)

    scale = max(16, args.clients)
    tpcb = None if args.no_tpcb else tpcb_like(clients=args.clients, seconds=args.seconds, scale=scale)
    plain, plain_check = plain_sql(clients=args.clients, seconds=args.seconds, accounts=args.accounts)
    results, facts = engine(
        clients=args.clients, seconds=args.seconds, batch=args.batch, accounts=args.accounts, cases=cases
    )

    print()
    print_machine(machine)
    if tpcb is not None:
        print(f"pgbench tpcb-like, read committed, scale {scale}: {describe(tpcb)}")
    for case, result in plain.items():
        print(f"plain-SQL post_transfer {case:8}:           {describe(result)}")
    how = f"execute_many, batches of {args.batch}" if facts["batched"] else "execute, one command per call"
    if not facts["execute_many"]:
        how += " (LedgerService.execute_many does not exist)"
    print(f"engine ({how}, {args.clients} threads, {args.accounts:,} accounts):")
    for case, r in results.items():
        cpu = r.cpu_ms_per_posting
        print(
            f"  {case:12} {r.rate:9,.0f} postings/s  ({r.postings:,} in {r.seconds:.1f} s, {r.retries} retries,"
            f" {r.exhausted} exhausted, {r.failed} failed)  CPU ms/posting: bench {cpu['self']:.2f},"
            f" postgres {cpu['postgres']:.2f}, machine {cpu['machine']:.2f}"
        )
    rate = {case: r.rate for case, r in results.items()}
    ratios = {
        "engine_uniform/plain_uniform": ratio(rate.get("uniform"), plain["uniform"].tps),
        "engine_hot_transfer/plain_hot": ratio(rate.get("hot-transfer"), plain["hot"].tps),
        "engine_hot_credit/plain_hot": ratio(rate.get("hot-credit"), plain["hot"].tps),
        "engine_hot_transfer/engine_uniform": ratio(rate.get("hot-transfer"), rate.get("uniform")),
        "engine_hot_credit/engine_uniform": ratio(rate.get("hot-credit"), rate.get("uniform")),
        "plain_hot/plain_uniform": ratio(plain["hot"].tps, plain["uniform"].tps),
        "engine_uniform/tpcb": ratio(rate.get("uniform"), tpcb.tps if tpcb else None),
        "plain_uniform/tpcb": ratio(plain["uniform"].tps, tpcb.tps if tpcb else None),
    }
    ratios = {name: value for name, value in ratios.items() if value is not None}
    for name, value in ratios.items():
        print(f"ratio {name:36} {value:.3f}")
    violations = facts["verify_violations"]
    print(f"ledger verify: {violations or 'no violations'}")
    print(f"plain-SQL books: {plain_check}")
    write_results(
        "postings",
        started=started,
        machine=machine,
        parameters={**vars(args), "cases": cases, "tpcb_scale": scale, "engine_mode": how},
        figures={
            "tpcb_like": tpcb,
            "plain_sql": plain,
            "engine": results,
            "engine_setup_seconds": facts["setup_seconds"],
        },
        ratios=ratios,
        checks={"ledger_verify_violations": violations, "plain_sql": plain_check},
    )
    if violations:
        sys.exit(1)


if __name__ == "__main__":
    main()
