"""RabbitMQ, Redis and PostgreSQL restarted in turn under load: every accepted operation settles exactly once.

The services are this machine's own (as in CI): the test restarts them with the same commands `ops/lib.sh`
starts them with, and waits until each answers again before the next.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.verify import verify
from core.bootstrap import LedgerService
from core.settings import Settings
from tests.helpers import balance, open_account
from tests.processes import ROOT, ManagedProcess, free_port, ingress_command, wait_for_port, worker_command

CLIENTS = 6
ACCOUNTS = 20
# A client gives up on one request after this long, seconds (it retries 503s and lost connections).
REQUEST_DEADLINE_S = 90.0


# Each service's URL variable and default port: where it must answer again after its restart.
SERVICE_URLS = {
    "postgres": ("CLEANLEDGER_DATABASE_URL", 5432),
    "redis": ("CLEANLEDGER_REDIS_URL", 6379),
    "rabbitmq": ("CLEANLEDGER_AMQP_URL", 5672),
}


def restart(service: str) -> None:
    """Restart one of the services, wherever ops/services found or started it; it answers again after."""
    subprocess.run([str(ROOT / "ops" / "services"), "restart", service], check=True, capture_output=True, timeout=180)
    variable, default = SERVICE_URLS[service]
    url = os.environ.get(variable)
    wait_for_port(urlsplit(url).port or default if url else default, 30)


def restart_rabbitmq() -> None:
    # Stops the broker application (every connection drops, queues recover from disk), then starts it again.
    restart("rabbitmq")


def restart_redis() -> None:
    restart("redis")


def restart_postgres() -> None:
    restart("postgres")


@pytest.fixture
def node(service_env: dict[str, str]) -> Iterator[int]:
    """One ingress node, two workers and the redelivery sweeper, as separate OS processes: the Procfile's
    roles. The sweeper republishes what an ingress recorded but could not publish while RabbitMQ was down
    (after 5 s here instead of 120)."""
    if not (shutil.which("rabbitmqctl") and shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.fail("this test restarts the services: rabbitmqctl, redis-server and redis-cli are needed")
    port = free_port()
    env = {
        **service_env,
        "CLEANLEDGER_RATE_LIMIT_BURST": "100000",  # a load, not a rate-limit test
        "CLEANLEDGER_REDELIVER_AFTER_S": "5",
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            ManagedProcess.start([sys.executable, "-m", "workers.redeliver"], env=env, name="restart-redeliver")
        )
        for i in range(2):
            stack.enter_context(ManagedProcess.start(worker_command(), env=env, name=f"restart-worker-{i}"))
        stack.enter_context(ManagedProcess.start(ingress_command(port), env=env, name="restart-ingress", port=port))
        yield port


@pytest.mark.slow
def test_services_restarted_under_load_lose_nothing_and_post_nothing_twice(
    node: int, ledger: LedgerService, tenant: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_api_key(ledger.pool, tenant)[1]
    accounts = [open_account(ledger, tenant) for _ in range(ACCOUNTS)]
    accepted: dict[str, tuple[str, str, int]] = {}  # operation id -> (key, account, amount)
    refused: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def post(idempotency_key: str, body: bytes) -> tuple[int, dict[str, object]] | None:
        """Like a careful client: the same request with the same key until it is answered for good."""
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", node, timeout=15)
            try:
                conn.request(
                    "POST",
                    "/v1/credits",
                    body,
                    {"Authorization": f"Bearer {secret}", "Content-Type": "application/json",
                     "Idempotency-Key": idempotency_key},
                )  # fmt: skip
                response = conn.getresponse()
                document = json.loads(response.read() or b"{}")
                if response.status not in (409, 503):
                    return response.status, document
            except (OSError, http.client.HTTPException, ValueError):
                pass  # the node or a service is restarting: try again
            finally:
                conn.close()
            time.sleep(0.2)
        return None

    def client(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            account, amount, idempotency_key = rng.choice(accounts), rng.randint(1, 1_000), uuid.uuid4().hex
            body = json.dumps({"account_id": str(account), "amount": amount, "currency": "USD"}).encode()
            answer = post(idempotency_key, body)
            with lock:
                if answer is not None and answer[0] in (200, 201, 202):
                    accepted[str(answer[1]["id"])] = (idempotency_key, str(account), amount)
                else:
                    refused.append(answer[0] if answer else 0)

    def accepted_count() -> int:
        with lock:
            return len(accepted)

    def wait_for_progress(at_least: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while accepted_count() < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
        assert accepted_count() >= at_least, "the load stopped making progress after a restart"

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_for_progress(50)
        for restart in (restart_rabbitmq, restart_redis, restart_postgres):
            restart()
            wait_for_progress(accepted_count() + 50)
    finally:
        stop.set()
        for thread in threads:
            thread.join(REQUEST_DEADLINE_S + 20)
        ledger.pool.check()  # the restart broke the pooled connections of this test process: replace them

    assert not refused, f"requests refused for good: {refused[:10]}"
    operations = list(accepted)
    deadline = time.monotonic() + 120
    with psycopg.connect(settings.database_url, autocommit=True) as db:
        while True:
            row = db.execute(
                "SELECT count(*) FROM idempotency_keys WHERE operation_id = ANY(%s::uuid[]) AND status <> 'pending'",
                (operations,),
            ).fetchone()
            if (row and row[0] == len(operations)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if row != (len(operations),):
            pending = db.execute(
                "SELECT o.id, o.created_at, o.last_enqueued_at, now() FROM operations o JOIN idempotency_keys k"
                " ON k.operation_id = o.id WHERE o.id = ANY(%s::uuid[]) AND k.status = 'pending'",
                (operations,),
            ).fetchall()
            raise AssertionError(f"accepted operations never settled: {pending}")
        postings = dict(
            db.execute(
                "SELECT operation_id::text, count(*) FROM transactions WHERE operation_id = ANY(%s::uuid[])"
                " GROUP BY operation_id",
                (operations,),
            ).fetchall()
        )
        assert set(postings) == set(operations), "an accepted credit was not posted"
        assert set(postings.values()) == {1}, "an operation was posted twice"
        assert verify(db) == []
    expected: dict[str, int] = {}
    for _, account, amount in accepted.values():
        expected[account] = expected.get(account, 0) + amount
    assert {str(a): balance(ledger, tenant, a) for a in accounts if str(a) in expected} == expected
    with capsys.disabled():
        print(f"\n[restarts] accepted={len(operations)} settled={len(postings)} (RabbitMQ, Redis, PostgreSQL)")
