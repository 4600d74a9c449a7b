"""Batches end to end through nginx: postings settled/s by `POST /v1/batches`, against plain SQL in the same run.

A batch carries up to 1,000 transfers under one Idempotency-Key and settles in one commit, on the stack `ops/run`
runs; the baseline is the plain-SQL posting, which commits every transfer on its own.

    .venv/bin/python bench/batches.py [--in-flight 4] [--batch-size 1000] [--seconds 20] [--accounts 10000]
                                      [--baseline-clients 16] [--drain-seconds 60] [--no-baseline]
                                      [--without audit,mongo,webhooks]

1. Baseline first (bench/baseline.py): the plain-SQL `post_transfer` driven by pgbench, uniform (random source
   and destination) over `--accounts` accounts, for `--seconds`, with `--baseline-clients` clients: 16 by
   default, not `--in-flight`. A handful of batches in flight carry thousands of postings, while plain SQL
   needs many clients to keep both cores busy between its commits: with 4 it would be held back by its round
   trips and the ratio would flatter the batches. 16 is what bench/baseline.py and bench/amqp.py use, and
   e2e's 64 did no better in the runs of bench/README.md.
2. The private stack of bench/e2e.py, from its functions: a fresh, migrated database, a private command queue,
   every line of the Procfile (nginx on 127.0.0.1:8080, three ingress nodes, the workers, the relay, the audit
   consumer and its MongoDB in a directory of the run's own, the webhook worker), logs in a temp dir, and an API
   key from `cleanledger create-api-key --tenant bench`.
3. `--accounts` accounts opened and funded through batches: each batch (`Prefer: wait=30`) creates 500 accounts
   with ids chosen here and then credits each of them 10^9 cents, `--in-flight` batches at a time; every item
   must succeed.
4. One phase (bench/e2e.py's `run_phase`: CHECKPOINT, then CPU metered from /proc over the load and its drain):
   `--in-flight` batch requests are kept outstanding for `--seconds`, each `--batch-size` uniform random
   transfers (source != destination, 1..1000 cents: no account runs short) with a new Idempotency-Key and
   `Prefer: wait=30`, so an answer is the settled batch, whose items are read from it. Building a body (and
   reading a 201's 1,000 outcomes) is in the POST latency. Then the script waits up to `--drain-seconds` until
   no batch of the phase is pending.
   Reported: batches accepted and settled; postings settled/s = the phase's rows in `transactions` (joined to
   its idempotency keys) over the time from the phase's start to its last settlement (the last
   `idempotency_keys.settled_at`, as bench/e2e.py counts it); and, more conservative, the same rows over the time
   to the last answer (every answer is a settled batch, sent after its commit: `settled_at` is now(), the start
   of the settling transaction, so for a batch that takes ~0.5 s to settle the first window ends that much
   before the last commit); the commits that wrote the rows (distinct xmin); POST latency p50/p99 per batch,
   accept-to-settled p50/p99; items refused; the outbox backlog during the load; CPU milliseconds per posting of
   each process kind, e2e's: the Procfile's (ingress = its three nodes, worker = both), postgres, rabbitmq,
   redis, loadgen (this process) and machine (all CPU the machine spent). The audit trail and the webhooks
   still catching up with the outbox after the drain are not metered (as in e2e without --compare-without).
5. Checks: every batch answered 200/201 with status succeeded and all its items succeeded; the phase's
   accepted == settled == its idempotency keys, none pending; its rows in `transactions` == settled batches x
   `--batch-size`; `cleanledger verify` exits 0; the plain-SQL books balance. Exit 1 if one fails.
   Ratios: postings settled/s of the batches over plain-SQL uniform tps (issue 11 asks for >= 1.0), to the last
   settlement and to the last answer.
`--without NAMES` leaves those Procfile lines out of the stack (not nginx nor an ingress node: the load goes through
them); without `audit` the ingress sends no request records either. It measures the posting path alone.
Everything is stopped (SIGTERM to each process group, SIGKILL after 10 s), the queues, the Redis copies and the
database dropped, in finally blocks, as bench/e2e.py does. Results go to bench/results/batches-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import describe, plain_sql
from common import fresh_database, machine_facts, print_machine, ratio, run_started, write_results
from e2e import (
    OPENING_CREDIT,
    BodyMaker,
    Phase,
    Stack,
    api_key,
    api_session,
    body_maker,
    cleanledger,
    forget_redis_copies,
    names_off_the_load_path,
    preflight,
    private_queue,
    procfile,
    run_phase,
    settled_request,
    show,
    stack_env,
)

from core.adapters.postgres.migrate import migrate
from core.application.commands import MAX_BATCH_ITEMS
from core.settings import Settings

TENANT = "bench"
PATH = "/v1/batches"
WAIT_S = 30  # Prefer: wait=N of every batch (the ingress's cap)
BASELINE_CLIENTS = 16
SETUP_ACCOUNTS_PER_BATCH = MAX_BATCH_ITEMS // 2  # a create_account and a credit item each

PHASE_POSTINGS_SQL = """
SELECT count(*), count(DISTINCT t.operation_id), count(DISTINCT t.xmin::text)
FROM transactions t JOIN idempotency_keys k ON k.operation_id = t.operation_id
WHERE k.tenant_id = %s AND starts_with(k.key, %s)
"""


# --- setup -----------------------------------------------------------------------------------------------------
def opening_items(ids: list[str]) -> list[dict[str, Any]]:
    """Create every account of `ids`, then credit each: the credits see the accounts created before them."""
    created = [{"type": "create_account", "currency": "USD", "id": account_id} for account_id in ids]
    credits = [
        {"type": "credit", "account_id": account_id, "amount": OPENING_CREDIT, "currency": "USD"} for account_id in ids
    ]
    return created + credits


async def open_accounts_in_batches(session: aiohttp.ClientSession, accounts: int, concurrency: int) -> list[str]:
    """`accounts` accounts opened and funded by batches, `concurrency` at a time; their ids."""
    ids = [str(uuid.uuid4()) for _ in range(accounts)]
    gate = asyncio.Semaphore(concurrency)

    async def one(chunk: list[str]) -> None:
        async with gate:
            doc = await settled_request(session, PATH, {"items": opening_items(chunk)})
        statuses = Counter(item.get("status") for item in doc["result"]["items"])
        if statuses != Counter({"succeeded": 2 * len(chunk)}):
            failed = [item for item in doc["result"]["items"] if item.get("status") != "succeeded"]
            raise RuntimeError(f"opening batch {doc['id']}: items {dict(statuses)}, first failure {failed[:1]}")

    chunks = [ids[i : i + SETUP_ACCOUNTS_PER_BATCH] for i in range(0, accounts, SETUP_ACCOUNTS_PER_BATCH)]
    await asyncio.gather(*(one(chunk) for chunk in chunks))
    return ids


# --- the load --------------------------------------------------------------------------------------------------
def transfer_batches(ids: list[str], size: int) -> BodyMaker:
    """A batch of `size` uniform random transfers (bench/e2e.py's `uniform` bodies, typed as batch items)."""
    _, transfer = body_maker("uniform", ids)

    def make(rng: random.Random) -> dict[str, Any]:
        return {"items": [{"type": "transfer", **transfer(rng)} for _ in range(size)]}

    return make


@dataclass
class Answers:
    """What the settled answers (200/201 with a final status) said: the batches' statuses, their items'
    statuses and the codes of the items refused."""

    batch_size: int
    batches: Counter[str] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    wrong_size: int = 0  # settled answers whose items do not number --batch-size

    def settled(self, raw: bytes) -> bool:
        """e2e's `generate` judge: the answer carries the batch's final status; its items are counted."""
        try:
            doc = json.loads(raw)
        except ValueError:
            return False
        status = doc.get("status") if isinstance(doc, dict) else None
        if status not in ("succeeded", "failed"):
            return False
        self.batches[status] += 1
        items = (doc.get("result") or {}).get("items") or []
        if len(items) != self.batch_size:
            self.wrong_size += 1
        for item in items:
            self.items[str(item.get("status"))] += 1
            if item.get("status") != "succeeded":
                self.refused[str((item.get("problem") or {}).get("code"))] += 1
        return True


@dataclass
class Postings:
    """The phase's postings, from the database."""

    transactions: int  # rows in `transactions` of the phase's batches
    batches: int  # distinct operations among them
    commits: int  # distinct xmin among them: the commits that wrote them
    window_s: float | None  # from the phase's start to its last settlement (settled_at)
    per_s: float | None
    to_last_answer_s: float  # from the phase's start to the last answer (after the last commit)
    per_s_to_last_answer: float | None
    cpu_ms_per_posting: dict[str, float | None]


def phase_postings(conn: psycopg.Connection[Any], prefix: str, phase: Phase) -> Postings:
    row = conn.execute(PHASE_POSTINGS_SQL, (TENANT, prefix)).fetchone()
    assert row is not None
    transactions, batches, commits = (int(n) for n in row)
    # run_phase's settled/s is its settled batches over (last settled_at - phase start): the same window.
    window = phase.settled / phase.settled_per_s if phase.settled_per_s else None
    return Postings(
        transactions=transactions,
        batches=batches,
        commits=commits,
        window_s=window,
        per_s=transactions / window if window else None,
        to_last_answer_s=phase.load_seconds,
        per_s_to_last_answer=transactions / phase.load_seconds if phase.load_seconds else None,
        cpu_ms_per_posting={
            kind: (1000 * seconds / transactions if transactions else None)
            for kind, seconds in phase.cpu_seconds.items()
        },
    )


@dataclass
class Measured:
    setup_seconds: float
    phase: Phase
    answers: Answers
    postings: Postings


async def measure(stack: Stack, secret: str, *, db_url: str, args: argparse.Namespace) -> Measured:
    """Open and fund the accounts by batches, then the measured phase."""
    async with api_session(secret, args.in_flight) as session:
        setup_started = time.perf_counter()
        ids = await open_accounts_in_batches(session, args.accounts, args.in_flight)
        setup_s = time.perf_counter() - setup_started
        print(f"{args.accounts:,} accounts opened and funded by batches in {setup_s:.1f} s")
        answers = Answers(args.batch_size)
        prefix = f"batches-{uuid.uuid4().hex[:8]}-"
        with psycopg.connect(db_url, autocommit=True) as conn:
            phase = await run_phase(
                session,
                conn,
                stack,
                case="uniform",
                mode="wait",
                ids=ids,
                in_flight=args.in_flight,
                seconds=args.seconds,
                drain_s=args.drain_seconds,
                db_url=db_url,
                tenant=TENANT,
                prefix=prefix,
                request=(PATH, transfer_batches(ids, args.batch_size)),
                wait_s=WAIT_S,
                is_settled=answers.settled,
            )
            postings = phase_postings(conn, prefix, phase)
    return Measured(setup_s, phase, answers, postings)


def show_postings(measured: Measured, batch_size: int) -> None:
    phase, postings, answers = measured.phase, measured.postings, measured.answers

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}/s"

    window = "-" if postings.window_s is None else f"{postings.window_s:.2f}"
    print(
        f"batches of {batch_size}: {phase.accepted:,} accepted, {phase.settled:,} settled;"
        f" postings settled {rate(postings.per_s)} ({postings.transactions:,} in {window} s to the last settled_at,"
        f" {postings.commits:,} commits); to the last answer {rate(postings.per_s_to_last_answer)}"
        f" ({postings.to_last_answer_s:.2f} s)"
    )
    refused = sum(n for status, n in answers.items.items() if status != "succeeded")
    print(
        f"    answers: batches {dict(answers.batches) or 'none'}, items {dict(answers.items) or 'none'},"
        f" refused {refused}{f' {dict(answers.refused)}' if refused else ''}"
    )
    cpu = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in postings.cpu_ms_per_posting.items())
    print(f"    CPU ms per posting: {cpu}")


# --- main ------------------------------------------------------------------------------------------------------
def checks_of(measured: Measured, batch_size: int) -> dict[str, Any]:
    phase, answers, postings = measured.phase, measured.answers, measured.postings
    return {
        "phase_consistent": phase.consistent,  # accepted == settled == keys in the database, none pending
        "every_request_answered_2xx": phase.requests == phase.accepted and not phase.client_errors,
        "every_answer_settled": phase.settled_in_answer == phase.accepted,
        "every_batch_succeeded": answers.batches == Counter({"succeeded": phase.accepted}) and phase.failed == 0,
        "every_item_succeeded": answers.items == Counter({"succeeded": phase.accepted * batch_size})
        and answers.wrong_size == 0,
        "transactions_of_phase": postings.transactions,
        "transactions_expected": phase.settled * batch_size,
        "transactions_match": postings.transactions == phase.settled * batch_size and postings.batches == phase.settled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--in-flight", type=int, default=4, help="batch requests kept outstanding")
    parser.add_argument("--batch-size", type=int, default=MAX_BATCH_ITEMS, help="transfers per batch")
    parser.add_argument("--seconds", type=int, default=20, help="load seconds (and baseline seconds)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--baseline-clients", type=int, default=BASELINE_CLIENTS, help="pgbench clients")
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="longest wait for the phase to settle")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-SQL baseline (no ratio)")
    parser.add_argument(
        "--without",
        default="",
        help="Procfile names to leave out, comma-separated (e.g. audit,mongo,webhooks: the posting path alone)",
    )
    args = parser.parse_args()
    if not 1 <= args.batch_size <= MAX_BATCH_ITEMS:
        parser.error(f"--batch-size is 1 to {MAX_BATCH_ITEMS}")
    if args.accounts < 2 or args.in_flight < 1 or args.seconds < 1:
        parser.error("--accounts is at least 2, --in-flight and --seconds at least 1")
    without = frozenset(names_off_the_load_path(parser, "--without", args.without))
    preflight()
    started = run_started()
    machine = machine_facts()
    print_machine(machine)
    settings = Settings.from_env()

    plain, plain_check = (
        ({}, {})
        if args.no_baseline
        else plain_sql(clients=args.baseline_clients, seconds=args.seconds, accounts=args.accounts, cases=("uniform",))
    )
    for case, result in plain.items():
        print(f"plain-SQL post_transfer {case} ({args.baseline_clients} clients): {describe(result)}")

    measured: Measured | None = None
    checks: dict[str, Any] = {}
    facts: dict[str, Any] = {"procfile": dict(procfile())}
    log_dir = Path(tempfile.mkdtemp(prefix="cleanledger-batches-"))
    with fresh_database("bench_batches") as db_url, private_queue(settings.amqp_url) as queue:
        env = stack_env(db_url, queue)
        if "audit" in without:  # nobody to read the ingress's request records: they are not sent
            env["CLEANLEDGER_AUDIT_REQUESTS"] = "false"
        migrate(Settings.from_env(env))
        stack = Stack(env, log_dir, exclude=without, mongo_dir=log_dir / "mongo")
        try:
            stack.start()
            stack.wait_ready()
            secret = api_key(env, TENANT)
            measured = asyncio.run(measure(stack, secret, db_url=db_url, args=args))
            facts["setup_seconds"] = measured.setup_seconds
            verified = cleanledger(env, "verify")
            checks["verify_exit_code"] = verified.returncode
            checks["verify_output"] = verified.stdout.strip().splitlines()[-5:]
            print(f"cleanledger verify: exit {verified.returncode}: {verified.stdout.strip().splitlines()[-1:]}")
        finally:
            facts["exit_codes"] = stack.stop()
            facts["log_dir"] = str(log_dir)
            facts["log_problems"] = stack.log_problems()
            with contextlib.suppress(Exception):
                facts["redis_keys_removed"] = forget_redis_copies(settings.redis_url, db_url)
            shutil.rmtree(log_dir / "mongo", ignore_errors=True)  # the run's audit trail: data, not a log

    assert measured is not None  # the stack's failures raised above
    checks.update(checks_of(measured, args.batch_size))
    checks["plain_sql"] = plain_check
    ok = (
        checks.get("verify_exit_code") == 0
        and all(checks[name] for name in checks if name.startswith("every_") or name == "phase_consistent")
        and checks["transactions_match"]
        and plain_check.get("ok", True) is True
    )
    checks["ok"] = ok

    print()
    print_machine(machine)
    for case, result in plain.items():
        print(f"plain-SQL post_transfer {case} ({args.baseline_clients} clients): {describe(result)}")
    print("the batch phase (its operations are batches):")
    show(measured.phase)
    show_postings(measured, args.batch_size)
    base = plain.get("uniform")
    ratios = {
        "batch_postings_per_s/plain_uniform": ratio(measured.postings.per_s, base.tps if base else None),
        "batch_postings_per_s_to_last_answer/plain_uniform": ratio(
            measured.postings.per_s_to_last_answer, base.tps if base else None
        ),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    for name, value in ratios.items():
        print(f"ratio {name:50} {value:.3f}  (issue 11 asks for >= 1.0)")
    for name, problems in facts["log_problems"].items():
        print(f"log {name}: {problems['lines']} warning/error lines, first: {problems['first'][0]}")
    unclean = {name: code for name, code in facts["exit_codes"].items() if code != 0}
    if unclean:
        print(f"WARNING: processes that did not exit 0 on SIGTERM: {unclean}")
    failed = [name for name, value in checks.items() if value is False]
    verdict = "ok" if ok else f"FAILED {failed}"
    print(f"checks: {verdict}, verify exit {checks.get('verify_exit_code')}")
    print(f"process logs: {log_dir}")
    write_results(
        "batches",
        started=started,
        machine=machine,
        parameters={**vars(args), "wait_s": WAIT_S, "baseline_case": "uniform"},
        figures={
            "plain_sql": plain,
            "phase": measured.phase,
            "postings": measured.postings,
            "answers": {
                "batches": measured.answers.batches,
                "items": measured.answers.items,
                "refused": measured.answers.refused,
                "wrong_size": measured.answers.wrong_size,
            },
            **facts,
        },
        ratios=ratios,
        checks=checks,
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
