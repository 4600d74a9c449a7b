"""The Redis adapter against a real Redis server: rate limiting, the operation cache, settlement notifications,
and how each degrades when Redis cannot be reached (a client pointed at a closed port)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import structlog
from structlog.testing import capture_logs

from core.adapters.redis import (
    CachedKey,
    OperationCache,
    SettlementPublisher,
    SettlementWaiter,
    TokenBucket,
    async_client,
    sync_client,
)
from core.adapters.redis import cache as cache_module
from core.adapters.redis import rate_limit as rate_limit_module
from core.adapters.redis import waiter as waiter_module
from core.adapters.redis.keys import SETTLED_CHANNEL, idempotency_key, rate_limit_key, result_key

REDIS_URL = os.environ.get(
    "CLEANLEDGER_TEST_REDIS_URL", os.environ.get("CLEANLEDGER_REDIS_URL", "redis://127.0.0.1:6379/0")
)
CLOSED_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once
LEDGER = str(uuid.uuid4())  # a ledger_instance id of this run's own


def uid() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    c = async_client(REDIS_URL)
    try:
        await c.ping()
    except Exception as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc!r}")
    yield c
    await c.aclose()


@pytest.fixture
async def dead_client() -> AsyncIterator[redis.asyncio.Redis]:
    c = async_client(CLOSED_URL)
    yield c
    await c.aclose()


@pytest.fixture
def publisher() -> Iterator[SettlementPublisher]:
    c = sync_client(REDIS_URL)
    yield SettlementPublisher(c)
    c.close()


@pytest.fixture
async def waiter(client: redis.asyncio.Redis) -> AsyncIterator[SettlementWaiter]:
    w = SettlementWaiter(client)
    await w.start()
    assert w.connected
    yield w
    await w.close()


async def settle(publisher: SettlementPublisher, operation_id: str, document: dict[str, Any]) -> None:
    """What a worker does once the operation is committed in PostgreSQL (in a thread: the publisher is sync)."""
    await asyncio.to_thread(publisher.settled, operation_id, document, ttl_s=60)


async def never() -> dict[str, Any] | None:
    """A check for an operation that never settles."""
    return None


async def assert_woken_by_settlement(
    waiter: SettlementWaiter, cache: OperationCache, publisher: SettlementPublisher, *, idle_s: float = 0.2
) -> None:
    """A waiter subscribed for `idle_s` seconds is woken by the settlement, well before its 10 s timeout."""
    op = uid()
    task = asyncio.create_task(waiter.wait(op, 10, check=lambda: cache.get_result(op)))
    await asyncio.sleep(idle_s)
    started = time.monotonic()
    await settle(publisher, op, {"operation_id": op})
    assert await asyncio.wait_for(task, 5) == {"operation_id": op}
    assert time.monotonic() - started < 1


def peeker(cache: OperationCache, op: str) -> Any:
    return lambda: cache.get_result(op)


async def numsub(client: redis.asyncio.Redis, channel: str) -> int:
    [(_, count)] = await client.pubsub_numsub(channel)
    return int(count)


def no_waiter_left(waiter: SettlementWaiter, *ops: str) -> None:
    assert not any(op in waiter._waiters for op in ops), "a finished wait left its registration behind"


# --- token bucket -----------------------------------------------------------------------------------------
async def test_bucket_allows_exactly_capacity_then_denies(client: redis.asyncio.Redis) -> None:
    bucket = TokenBucket(client, capacity=5, refill_per_second=0.01)  # one token per 100 s: no refill in the test
    key_id = uid()
    decisions = [await bucket.take(key_id) for _ in range(5)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert all(d.retry_after_s == 0.0 for d in decisions)
    denied = await bucket.take(key_id)
    assert not denied.allowed
    assert denied.remaining == 0
    assert 90 < denied.retry_after_s <= 100  # about one token's refill time
    assert (await bucket.take(uid())).allowed  # another API key has a bucket of its own


async def test_bucket_refills_over_time(client: redis.asyncio.Redis) -> None:
    bucket = TokenBucket(client, capacity=3, refill_per_second=20)  # one token per 50 ms
    key_id = uid()
    for _ in range(3):
        assert (await bucket.take(key_id)).allowed
    denied = await bucket.take(key_id)
    if denied.allowed:  # the test machine stalled more than 50 ms between two takes; nothing to measure
        pytest.skip("too slow to observe an empty bucket")
    assert 0 < denied.retry_after_s <= 0.05 + 1e-6
    await asyncio.sleep(0.3)  # refills 6 tokens' worth, capped at the capacity
    again = [await bucket.take(key_id) for _ in range(3)]
    assert all(d.allowed for d in again)


async def test_bucket_cost_and_expiry(client: redis.asyncio.Redis) -> None:
    bucket = TokenBucket(client, capacity=10, refill_per_second=2)
    key_id = uid()
    decision = await bucket.take(key_id, cost=7)
    assert decision.allowed
    assert decision.remaining == 3
    denied = await bucket.take(key_id, cost=5)
    assert not denied.allowed
    assert 0.9 < denied.retry_after_s <= 1.0  # 2 more tokens at 2 a second
    # The key lives about as long as a full refill takes (5 s, +1 s margin), then the bucket is simply full.
    ttl_ms = await client.pttl(rate_limit_key(key_id))
    assert 4_000 < ttl_ms <= 6_000
    with pytest.raises(ValueError, match="cost"):
        await bucket.take(key_id, cost=11)


async def test_concurrent_takes_never_over_grant(client: redis.asyncio.Redis) -> None:
    bucket = TokenBucket(client, capacity=20, refill_per_second=0.01)
    key_id = uid()
    decisions = await asyncio.gather(*(bucket.take(key_id) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 20
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(20))


async def test_bucket_fails_open_when_redis_is_down(
    dead_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = TokenBucket(dead_client, capacity=2, refill_per_second=1)
    with capture_logs() as logs:
        monkeypatch.setattr(rate_limit_module, "log", structlog.get_logger("test"))
        started = time.monotonic()
        decisions = [await bucket.take(uid()) for _ in range(5)]
        elapsed = time.monotonic() - started
    assert all(d.allowed for d in decisions)
    assert elapsed < 2  # failing fast, not waiting out retries
    assert [e["log_level"] for e in logs if e["event"] == "rate_limit.redis_unavailable"] == ["warning"] * 5


# --- operation cache --------------------------------------------------------------------------------------
async def test_idempotency_key_round_trip(client: redis.asyncio.Redis) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    tenant, key, op = f"t-{uid()}", f"key {uid()} with spaces:and:colons", uid()
    assert await cache.lookup_key(tenant, key) is None
    await cache.remember_key(tenant, key, operation_id=op, fingerprint="sha256:abc", ttl_s=60)
    assert await cache.lookup_key(tenant, key) == CachedKey(operation_id=op, fingerprint="sha256:abc")
    assert await cache.lookup_key(f"t-{uid()}", key) is None  # keys are per tenant
    name = idempotency_key(LEDGER, tenant, key)
    assert name.startswith(f"cleanledger:idem:{LEDGER}:{tenant}:") and len(name.rsplit(":", 1)[1]) == 64
    assert 0 < await client.ttl(name) <= 60


async def test_a_recreated_database_never_meets_the_old_databases_keys(client: redis.asyncio.Redis) -> None:
    old, recreated = OperationCache(client, ledger_id=LEDGER), OperationCache(client, ledger_id=str(uuid.uuid4()))
    tenant = f"t-{uid()}"
    await old.remember_key(tenant, "acct-alice", operation_id=uid(), fingerprint="sha256:abc", ttl_s=60)
    assert await old.lookup_key(tenant, "acct-alice") is not None
    assert await recreated.lookup_key(tenant, "acct-alice") is None


async def test_result_round_trip_through_the_publisher(
    client: redis.asyncio.Redis, publisher: SettlementPublisher
) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    op = uid()
    assert await cache.get_result(op) is None
    document = {"operation_id": op, "status": "succeeded", "result": {"amount": 1000, "currency": "EUR"}}
    await settle(publisher, op, document)
    assert await cache.get_result(op) == document
    assert 0 < await client.ttl(result_key(op)) <= 60


async def test_corrupt_entries_are_misses(client: redis.asyncio.Redis) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    op, tenant = uid(), f"t-{uid()}"
    await client.set(result_key(op), b"\xff not json", ex=60)
    await client.set(idempotency_key(LEDGER, tenant, "k"), b'{"operation_id": 1}', ex=60)
    assert await cache.get_result(op) is None
    assert await cache.lookup_key(tenant, "k") is None


async def test_cache_misses_when_redis_is_down(
    dead_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = OperationCache(dead_client, ledger_id=LEDGER)
    with capture_logs() as logs:
        monkeypatch.setattr(cache_module, "log", structlog.get_logger("test"))
        await cache.remember_key("t", "k", operation_id="op", fingerprint="f", ttl_s=60)
        assert await cache.lookup_key("t", "k") is None
        assert await cache.get_result("op") is None
        dead = sync_client(CLOSED_URL)
        SettlementPublisher(dead).settled("op", {"status": "succeeded"}, ttl_s=60)
        SettlementPublisher(dead).settled("op", {"not json": object()}, ttl_s=60)
        dead.close()
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("cache.redis_unavailable", "warning")] * 3 + [
        ("settlement.redis_unavailable", "warning"),
        ("settlement.unserializable", "error"),
    ]


# --- settlement waiter ------------------------------------------------------------------------------------
async def test_waiter_is_woken_by_the_publish(
    client: redis.asyncio.Redis, waiter: SettlementWaiter, publisher: SettlementPublisher
) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    op = uid()
    calls = 0

    async def check() -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        return await cache.get_result(op)

    task = asyncio.create_task(waiter.wait(op, 10, check=check))
    await asyncio.sleep(0.2)
    assert not task.done()
    assert await numsub(client, SETTLED_CHANNEL) >= 1  # the node's one subscription, shared by every wait
    started = time.monotonic()
    await settle(publisher, op, {"operation_id": op, "status": "succeeded"})
    result = await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1  # woken, well before the 10 s timeout
    assert result == {"operation_id": op, "status": "succeeded"}
    assert calls == 2  # once after registering, once after the notification: no polling
    no_waiter_left(waiter, op)


async def test_settlement_before_wait_is_seen_by_check(
    client: redis.asyncio.Redis, waiter: SettlementWaiter, publisher: SettlementPublisher
) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    op = uid()
    await settle(publisher, op, {"operation_id": op, "status": "rejected"})
    started = time.monotonic()
    result = await waiter.wait(op, 10, check=lambda: cache.get_result(op))
    assert time.monotonic() - started < 1
    assert result == {"operation_id": op, "status": "rejected"}
    no_waiter_left(waiter, op)


async def test_concurrent_waiters_on_one_id_all_wake(
    client: redis.asyncio.Redis, waiter: SettlementWaiter, publisher: SettlementPublisher
) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    op, other = uid(), uid()
    tasks = [asyncio.create_task(waiter.wait(op, 10, check=lambda: cache.get_result(op))) for _ in range(2)]
    bystander = asyncio.create_task(waiter.wait(other, 10, check=lambda: cache.get_result(other)))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await settle(publisher, op, {"operation_id": op})
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert time.monotonic() - started < 1
    assert results == [{"operation_id": op}] * 2
    assert not bystander.done()
    await settle(publisher, other, {"operation_id": other})
    assert await asyncio.wait_for(bystander, 5) == {"operation_id": other}
    no_waiter_left(waiter, op)
    no_waiter_left(waiter, other)


async def test_many_waiters_on_different_ids(
    client: redis.asyncio.Redis, waiter: SettlementWaiter, publisher: SettlementPublisher
) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    ops = [uid() for _ in range(50)]

    def checker(op: str) -> Any:
        return lambda: cache.get_result(op)

    tasks = [asyncio.create_task(waiter.wait(op, 10, check=checker(op))) for op in ops]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    for op in ops:
        await settle(publisher, op, {"operation_id": op})
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert time.monotonic() - started < 2
    assert results == [{"operation_id": op} for op in ops]


async def test_one_announcement_wakes_every_operation_of_its_group(
    client: redis.asyncio.Redis, waiter: SettlementWaiter, publisher: SettlementPublisher
) -> None:
    cache = OperationCache(client, ledger_id=LEDGER)
    ops = [uid() for _ in range(20)]
    tasks = [asyncio.create_task(waiter.wait(op, 10, check=never, peek=peeker(cache, op))) for op in ops]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    # A worker's group: every result cached, then one PUBLISH naming them all.
    await asyncio.to_thread(publisher.settled_many, [(op, {"operation_id": op}) for op in ops], ttl_s=60)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert time.monotonic() - started < 1
    assert results == [{"operation_id": op} for op in ops]  # from the peek: `check` (PostgreSQL) never ran


async def test_the_announcement_carries_the_cached_entry(
    client: redis.asyncio.Redis, waiter: SettlementWaiter, publisher: SettlementPublisher
) -> None:
    op, peeks = uid(), 0

    async def peek() -> dict[str, Any] | None:
        nonlocal peeks
        peeks += 1
        return None

    task = asyncio.create_task(
        waiter.wait(op, 10, check=never, peek=peek, announced=lambda entry: {"from": "announcement", **entry})
    )
    await asyncio.sleep(0.2)
    await settle(publisher, op, {"operation_id": op, "status": "succeeded"})
    result = await asyncio.wait_for(task, 5)
    assert result == {"from": "announcement", "operation_id": op, "status": "succeeded"}
    assert peeks == 1  # only the look before waiting: the answer came with the notification


async def test_the_authoritative_check_decides_at_the_timeout(
    client: redis.asyncio.Redis, waiter: SettlementWaiter
) -> None:
    op, checks = uid(), 0

    async def check() -> dict[str, Any] | None:
        nonlocal checks
        checks += 1
        return {"operation_id": op, "from": "postgres"}  # settled, though its announcement was lost

    result = await waiter.wait(op, 0.3, check=check, peek=never)
    assert (result, checks) == ({"operation_id": op, "from": "postgres"}, 1)
    no_waiter_left(waiter, op)


async def test_wait_times_out_with_none(client: redis.asyncio.Redis, waiter: SettlementWaiter) -> None:
    calls = 0

    async def check() -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        return None

    op = uid()
    started = time.monotonic()
    assert await waiter.wait(op, 0.3, check=check) is None
    assert 0.3 <= time.monotonic() - started < 1.5
    assert calls == 2  # before waiting and at the timeout
    no_waiter_left(waiter, op)


async def test_cancelled_wait_leaves_no_registration(client: redis.asyncio.Redis, waiter: SettlementWaiter) -> None:
    op = uid()
    task = asyncio.create_task(waiter.wait(op, 10, check=never))
    await asyncio.sleep(0.2)
    assert await numsub(client, SETTLED_CHANNEL) >= 1  # the node's one subscription, shared by every wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    no_waiter_left(waiter, op)


async def test_wait_polls_when_redis_is_down(dead_client: redis.asyncio.Redis) -> None:
    waiter = SettlementWaiter(dead_client)
    await waiter.start()  # does not raise; the reader keeps trying in the background
    assert not waiter.connected
    calls = 0
    ready_at = time.monotonic() + 0.6

    async def check() -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        return {"status": "succeeded"} if time.monotonic() >= ready_at else None

    try:
        result = await asyncio.wait_for(waiter.wait(uid(), 10, check=check), 5)
        assert result == {"status": "succeeded"}
        assert time.monotonic() - ready_at < 1  # polling backoff is capped at 0.5 s
        assert calls <= 10  # 50 ms doubling to 500 ms: no busy loop

        calls = 0
        started = time.monotonic()
        ready_at = float("inf")
        assert await waiter.wait(uid(), 1, check=check) is None
        assert 1 <= time.monotonic() - started < 2
        assert calls <= 8
    finally:
        await waiter.close()


async def test_waiter_recovers_when_its_connection_is_killed(
    client: redis.asyncio.Redis, publisher: SettlementPublisher
) -> None:
    waiter = SettlementWaiter(client, reconnect_initial_s=0.05)
    before = {c["id"] for c in await client.client_list(_type="pubsub")}
    await waiter.start()  # subscribes at once
    cache = OperationCache(client, ledger_id=LEDGER)
    try:
        op = uid()
        task = asyncio.create_task(waiter.wait(op, 10, check=lambda: cache.get_result(op)))
        await asyncio.sleep(0.2)
        ours = {c["id"] for c in await client.client_list(_type="pubsub")} - before
        if len(ours) != 1:
            pytest.skip("cannot tell this waiter's connection from other pub/sub clients")
        await client.client_kill_filter(_id=ours.pop())
        await asyncio.sleep(0.2)
        # The wait in progress polls now; it still sees the settlement.
        await settle(publisher, op, {"operation_id": op})
        assert await asyncio.wait_for(task, 5) == {"operation_id": op}
        # And the reader reconnects, so later waits are woken by notifications again.
        for _ in range(100):
            if waiter.connected:
                break
            await asyncio.sleep(0.05)
        assert waiter.connected
        await assert_woken_by_settlement(waiter, cache, publisher)
    finally:
        await waiter.close()


async def test_idle_pings_keep_the_connection(
    client: redis.asyncio.Redis, publisher: SettlementPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiter = SettlementWaiter(client, idle_ping_s=0.05)
    cache = OperationCache(client, ledger_id=LEDGER)
    with capture_logs() as logs:
        monkeypatch.setattr(waiter_module, "log", structlog.get_logger("test"))
        await waiter.start()
        try:
            await asyncio.sleep(0.5)  # idle, unsubscribed: about ten PINGs, each answered
            await assert_woken_by_settlement(waiter, cache, publisher, idle_s=0.5)  # idle while subscribed
        finally:
            await waiter.close()
    assert [e for e in logs if e["event"] == "waiter.redis_unavailable"] == []  # never lost, never reconnected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed")
    return path


async def test_waiter_connects_late_and_survives_a_server_stop(redis_server_binary: str, tmp_path: Path) -> None:
    """Redis down at start-up, then up (notifications work), then gone again (polling works)."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    client = async_client(url)
    waiter = SettlementWaiter(client, reconnect_initial_s=0.05, reconnect_max_s=0.2)
    await waiter.start()
    assert not waiter.connected
    server = subprocess.Popen(
        [redis_server_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if waiter.connected:
                break
            await asyncio.sleep(0.05)
        assert waiter.connected
        cache = OperationCache(client, ledger_id=LEDGER)
        sync = sync_client(url)
        publisher = SettlementPublisher(sync)
        await assert_woken_by_settlement(waiter, cache, publisher)
        sync.close()

        waiting = asyncio.create_task(waiter.wait(uid(), 10, check=never))
        late = uid()
        ready_at = time.monotonic() + 1.0

        async def check_late() -> dict[str, Any] | None:
            return {"operation_id": late} if time.monotonic() >= ready_at else None

        late_task = asyncio.create_task(waiter.wait(late, 10, check=check_late))
        await asyncio.sleep(0.2)
        server.terminate()
        server.wait(10)
        # Both waits fall back to polling; the one whose check turns up a document returns it.
        assert await asyncio.wait_for(late_task, 5) == {"operation_id": late}
        assert not waiting.done()
        assert not waiter.connected
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    finally:
        await waiter.close()
        await client.aclose()
        if server.poll() is None:
            server.kill()
            server.wait(10)
