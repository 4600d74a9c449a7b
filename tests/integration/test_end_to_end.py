"""The whole path with real processes: two ingress nodes, two worker processes, 500 concurrent transfers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.verify import verify
from core.bootstrap import LedgerService
from core.settings import Settings
from tests.processes import ManagedProcess, free_port, ingress_command, worker_command

TRANSFERS = 500
DUPLICATE_SHARE = 0.10
ACCOUNTS = 8


@pytest.fixture
def cluster(service_env: dict[str, str]) -> Iterator[list[str]]:
    """Two ingress nodes and two worker processes, as separate OS processes."""
    ports = [free_port(), free_port()]
    env = {**service_env, "CLEANLEDGER_RATE_LIMIT_BURST": "100000"}  # this test is a load, not a rate-limit test
    with contextlib.ExitStack() as stack:
        for i in range(2):
            stack.enter_context(ManagedProcess.start(worker_command(), env=env, name=f"e2e-worker-{i}"))
        for port in ports:
            stack.enter_context(
                ManagedProcess.start(ingress_command(port), env=env, name=f"e2e-ingress-{port}", port=port)
            )
        yield [f"http://127.0.0.1:{port}" for port in ports]


async def call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """One request, as a well-behaved client: a 409 idempotency-key-in-use is retried (after a tenth of
    Retry-After, to keep the test short)."""
    for _ in range(100):
        async with session.request(method, url, **kw) as response:
            doc = await response.json(content_type=None)
            if response.status != 409:
                return response.status, doc
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")) / 10)
    raise AssertionError(f"{url} stayed 409")


@pytest.mark.slow
def test_500_concurrent_transfers_through_two_nodes_settle_exactly_once(
    cluster: list[str], ledger: LedgerService, tenant: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_api_key(ledger.pool, tenant)[1]
    auth = {"Authorization": f"Bearer {secret}"}
    rng = random.Random(7)

    async def scenario() -> dict[str, Any]:
        async with aiohttp.ClientSession(headers=auth, timeout=aiohttp.ClientTimeout(total=60)) as session:
            accounts = []
            for i in range(ACCOUNTS):
                status, doc = await call(
                    session,
                    "POST",
                    f"{cluster[i % 2]}/v1/accounts",
                    json={"currency": "USD"},
                    headers={"Idempotency-Key": f"acct-{i}", "Prefer": "wait=10"},
                )
                assert status == 201, doc
                account_id = doc["result"]["account"]["id"]
                status, doc = await call(
                    session,
                    "POST",
                    f"{cluster[0]}/v1/credits",
                    json={"account_id": account_id, "amount": 50_000, "currency": "USD"},
                    headers={"Idempotency-Key": f"fund-{i}", "Prefer": "wait=10"},
                )
                assert status == 201, doc
                accounts.append(account_id)

            requests: list[tuple[str, dict[str, Any]]] = []
            for _ in range(TRANSFERS):
                if requests and rng.random() < DUPLICATE_SHARE:
                    requests.append(rng.choice(requests))
                else:
                    src, dst = rng.sample(accounts, 2)
                    body = {"source_id": src, "destination_id": dst, "amount": rng.randint(1, 4_000), "currency": "USD"}
                    requests.append((uuid.uuid4().hex, body))
            rng.shuffle(requests)

            started = time.perf_counter()
            answers = await asyncio.gather(
                *(
                    call(session, "POST", f"{cluster[i % 2]}/v1/transfers", json=body, headers={"Idempotency-Key": key})
                    for i, (key, body) in enumerate(requests)
                )
            )
            accepted_s = time.perf_counter() - started
            bad = [(status, doc) for status, doc in answers if status not in (200, 202)]
            assert not bad, bad[:3]
            op_by_key: dict[str, set[str]] = {}
            for (key, _), (_, doc) in zip(requests, answers, strict=True):
                op_by_key.setdefault(key, set()).add(doc["id"])
            assert all(len(ops) == 1 for ops in op_by_key.values()), "one key, one operation, on either node"

            final: dict[str, str] = {}
            for key, ops in op_by_key.items():
                (op_id,) = ops
                status, doc = await call(
                    session, "GET", f"{cluster[1]}/v1/operations/{op_id}", headers={"Prefer": "wait=30"}
                )
                assert status == 200
                final[key] = doc["status"]
            settled_s = time.perf_counter() - started
            return {"final": final, "accepted_s": accepted_s, "settled_s": settled_s, "requests": len(requests)}

    outcome = asyncio.run(scenario())
    final = outcome["final"]
    assert "pending" not in final.values(), "every 202 settles"
    succeeded = sum(1 for status in final.values() if status == "succeeded")
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM transactions WHERE tenant_id = %s AND kind = 'transfer'", (tenant,)
        ).fetchone()
    assert row == (succeeded,), "postings == distinct keys that succeeded"
    with psycopg.connect(settings.database_url) as conn:
        assert verify(conn) == []
    with capsys.disabled():
        print(
            f"\n[e2e] requests={outcome['requests']} distinct_keys={len(final)} postings={succeeded}"
            f" rejected={len(final) - succeeded} accepted_in_s={outcome['accepted_s']:.2f}"
            f" all_settled_in_s={outcome['settled_s']:.2f}"
        )
