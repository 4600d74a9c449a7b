"""Many threads, few accounts: SERIALIZABLE postings with retries keep the books exact."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import psycopg
import pytest

from core.adapters.postgres.verify import verify
from core.application.commands import Command, CreateAccount, Credit, Debit, Transfer
from core.application.retry import RetryCounter, RetryPolicy
from core.application.views import OperationResult, OperationStatus
from core.bootstrap import LedgerService, bootstrap
from core.domain.model import OverdraftPolicy
from core.settings import Settings
from tests.helpers import balance, credit, key, open_account

THREADS = 16
REQUESTS = 2_400  # including duplicates
DUPLICATE_SHARE = 0.15
BURSTS = 20  # rounds of THREADS requests with one idempotency key, released together


@pytest.fixture
def busy_ledger(settings: Settings) -> LedgerService:
    service = bootstrap(settings, pool_size=THREADS + 2, retry=RetryPolicy(counter=RetryCounter()))
    yield service  # type: ignore[misc]
    service.close()


def random_command(rng: random.Random, tenant: str, accounts: list[UUID]) -> Command:
    # Skewed: the first two accounts are hot and take about half of all traffic.
    def pick() -> UUID:
        return accounts[rng.randrange(2)] if rng.random() < 0.5 else rng.choice(accounts)

    kind = rng.random()
    amount = rng.randint(1, 5_000)
    from core.domain.money import Money

    if kind < 0.25:
        return Credit(tenant, pick(), Money.for_posting(amount, "USD"))
    if kind < 0.45:
        return Debit(tenant, pick(), Money.for_posting(amount, "USD"))
    src = pick()
    dst = pick()
    while dst == src:
        dst = rng.choice(accounts)
    return Transfer(tenant, src, dst, Money.for_posting(amount, "USD"))


@pytest.mark.slow
def test_random_concurrent_postings_keep_the_books_exact(
    busy_ledger: LedgerService, tenant: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20261126)
    ledger = busy_ledger
    # 10 accounts: 6 restricted (no overdraft), 2 with an overdraft limit, 2 unrestricted-ish (large limit).
    limits = [0, 0, 0, 0, 0, 0, 2_000, 10_000, 10**9, 10**9]
    accounts = [open_account(ledger, tenant, overdraft=limit) for limit in limits]
    for acc in accounts:
        credit(ledger, tenant, acc, 20_000)

    requests: list[tuple[str, Command]] = []
    for _ in range(REQUESTS):
        if requests and rng.random() < DUPLICATE_SHARE:
            requests.append(requests[max(0, len(requests) - rng.randint(1, 8))])  # a recent one: overlaps in time
        else:
            requests.append((key(), random_command(rng, tenant, accounts)))
    distinct_keys = {k for k, _ in requests}

    results: list[tuple[str, OperationResult]] = []
    lock = threading.Lock()

    def run(req: tuple[str, Command]) -> None:
        k, cmd = req
        outcome = ledger.execute(cmd, idempotency_key=k)
        with lock:
            results.append((k, outcome))

    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(run, r) for r in requests]:
            future.result()  # any TransientConflict that escaped the retries fails the test here
    wall = time.perf_counter() - started

    by_key: dict[str, set[UUID]] = {}
    for k, outcome in results:
        by_key.setdefault(k, set()).add(outcome.operation_id)
    assert all(len(ops) == 1 for ops in by_key.values()), "a key answered with two different operations"
    executed = Counter(k for k, outcome in results if not outcome.replayed)
    assert max(executed.values()) == 1, "a key was executed twice"
    assert set(executed) == distinct_keys

    succeeded = {k for k, o in results if o.status is OperationStatus.SUCCEEDED}
    rejected = {k for k, o in results if o.status is OperationStatus.FAILED}
    assert not succeeded & rejected
    with psycopg.connect(settings.database_url) as conn:
        posted = conn.execute(
            "SELECT count(*) FROM transactions WHERE tenant_id = %s AND metadata = '{}'::jsonb", (tenant,)
        ).fetchone()
        assert posted is not None
        # 10 set-up credits, then exactly one posting per distinct key that succeeded.
        assert posted[0] == len(accounts) + len(succeeded)
    with psycopg.connect(settings.database_url) as conn:
        assert verify(conn) == []
    for acc, limit in zip(accounts, limits, strict=True):
        assert balance(ledger, tenant, acc) >= -limit

    counter = ledger.retry.counter
    posting_retries = counter.retries
    assert counter.exhausted == 0

    # Postings of one account queue behind each other and rarely conflict any more. Claims of one key do:
    # every thread opens an account under the same key at the same instant, the first claim wins and the
    # others' inserts wait on it, fail with 40001 once it commits, and their retries replay its result.
    barrier = threading.Barrier(THREADS)
    opened: list[tuple[str, OperationResult]] = []

    def open_at_once(k: str) -> None:
        command = CreateAccount(tenant, "USD", OverdraftPolicy(0))
        barrier.wait()
        outcome = ledger.execute(command, idempotency_key=k)
        with lock:
            opened.append((k, outcome))

    burst_keys = [key() for _ in range(BURSTS)]
    with ThreadPoolExecutor(THREADS) as pool:
        for k in burst_keys:
            for future in [pool.submit(open_at_once, k) for _ in range(THREADS)]:
                future.result()
    for k in burst_keys:
        outcomes = [o for ok, o in opened if ok == k]
        assert len(outcomes) == THREADS
        assert len({o.operation_id for o in outcomes}) == 1
        assert sum(not o.replayed for o in outcomes) == 1
        assert all(o.status is OperationStatus.SUCCEEDED for o in outcomes)
    claim_retries = counter.retries - posting_retries

    with capsys.disabled():
        print(
            f"\n[concurrency] threads={THREADS} requests={len(requests)} distinct_keys={len(distinct_keys)}"
            f" postings={len(succeeded)} rejections={len(rejected)} replays={len(results) - len(executed)}"
            f" posting_retries={posting_retries} wall_s={wall:.2f} ops_per_s={len(requests) / wall:.0f}"
            f" | same-key bursts={BURSTS}x{THREADS} claim_retries={claim_retries} exhausted={counter.exhausted}"
        )
    assert claim_retries > 0, "the retry path never ran: the test is not contending"
    assert counter.exhausted == 0


@pytest.mark.slow
def test_opposite_transfers_between_two_accounts_never_deadlock(busy_ledger: LedgerService, tenant: str) -> None:
    ledger = busy_ledger
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 1_000_000)
    credit(ledger, tenant, b, 1_000_000)
    from core.domain.money import Money

    def move(i: int) -> OperationResult:
        src, dst = (a, b) if i % 2 else (b, a)
        return ledger.execute(Transfer(tenant, src, dst, Money.for_posting(7, "USD")), idempotency_key=key())

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(move, range(400)))
    assert all(o.status is OperationStatus.SUCCEEDED for o in outcomes)
    assert balance(ledger, tenant, a) + balance(ledger, tenant, b) == 2_000_000
    assert balance(ledger, tenant, a) == 1_000_000  # 200 each way
