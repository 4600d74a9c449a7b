"""The accept path on the real services: groups of requests recorded together and queued as one message, confirms
pipelined on one channel, and what an unconfirmed publish leaves behind (nothing)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pika
import psycopg
import pytest
from aiohttp.test_utils import TestClient

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.rabbitmq.commands import (
    COMMANDS_HEADER,
    EXECUTE_BATCH_ACTOR,
    AmqpCommandQueue,
    BrokerUnavailable,
    parse_command_message,
)
from core.adapters.rabbitmq.connection import queue_depth
from core.application.commands import CreateAccount
from core.application.ports import Claim
from core.bootstrap import LedgerService
from core.domain.ids import new_id
from core.settings import Settings
from ingress.app import init_app
from tests.services import delete_queues, private_queues

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
CLOSED_PORT_AMQP = "amqp://guest:guest@127.0.0.1:1/%2F"


@pytest.fixture
def unread(settings: Settings) -> Iterator[Settings]:
    """Settings with a command queue of their own that no worker reads: what the ingress queued stays there."""
    private = private_queues(settings, f"accept-{uuid.uuid4().hex[:8]}")
    yield private
    delete_queues(private)


@pytest.fixture
async def queue(unread: Settings) -> AsyncIterator[AmqpCommandQueue]:
    command_queue = AmqpCommandQueue(unread.amqp_url, queue_name=unread.command_queue)
    yield command_queue
    await command_queue.close()


def drain(settings: Settings) -> list[tuple[dict[str, Any], bytes]]:
    """Every message on the unread queue: (headers, body), in order; acknowledged."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        messages = []
        while True:
            method, properties, body = channel.basic_get(settings.command_queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((properties.headers or {}, body))
    finally:
        connection.close()


def claim(tenant: str) -> Claim:
    return Claim.for_command(CreateAccount(tenant, "USD"), uuid.uuid4().hex, new_id())


async def test_concurrent_publishes_are_each_confirmed_on_one_channel(
    queue: AmqpCommandQueue, unread: Settings, tenant: str
) -> None:
    batches = [[claim(tenant) for _ in range(n % 3 + 1)] for n in range(300)]
    await asyncio.gather(*(queue.publish(batch) for batch in batches))
    messages = await asyncio.to_thread(drain, unread)
    assert len(messages) == 300  # each confirmed publish is on the queue, once
    carried = [queued.operation_id for _, body in messages for _, queued in parse_command_message(body)]
    assert sorted(carried) == sorted(c.operation_id for batch in batches for c in batch)
    assert all(h[COMMANDS_HEADER] == len(parse_command_message(b)) for h, b in messages)


async def test_a_batch_message_rebuilds_each_command_as_its_own_message(
    queue: AmqpCommandQueue, unread: Settings, tenant: str
) -> None:
    batch = [claim(tenant) for _ in range(3)]
    await queue.publish(batch)
    [(_, body)] = await asyncio.to_thread(drain, unread)
    assert json.loads(body)["actor_name"] == EXECUTE_BATCH_ACTOR
    carried = parse_command_message(body)
    assert [(q.operation_id, q.idempotency_key) for _, q in carried] == [(c.operation_id, c.key) for c in batch]
    # What a retry of one of them sends on is a plain single-command message of the same command.
    document, queued = carried[1]
    [(again, requeued)] = parse_command_message(json.dumps(document).encode())
    assert (again["actor_name"], requeued) == ("execute_command", queued)


async def test_a_publish_to_an_unreachable_broker_fails_within_its_timeout(tenant: str) -> None:
    down = AmqpCommandQueue(CLOSED_PORT_AMQP, queue_name="nowhere")
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(BrokerUnavailable):
            await down.publish([claim(tenant)])
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await down.close()


async def test_a_message_no_queue_takes_is_not_confirmed(
    queue: AmqpCommandQueue, unread: Settings, tenant: str
) -> None:
    await queue.publish([claim(tenant)])  # connected, the queue declared
    await asyncio.to_thread(delete_queues, unread)  # then the queue vanishes under the open channel
    with pytest.raises(BrokerUnavailable, match="no queue took"):
        await queue.publish([claim(tenant)])


def close_connection(name: str) -> None:
    """Have RabbitMQ close the client connection named `name`, as an operator (or a broker restart) would."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    [pid] = [line.split("\t")[0] for line in listed.splitlines() if name in line]
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "closed by a test"], check=True, timeout=30)


async def test_the_publisher_reconnects_after_the_broker_closed_its_connection(unread: Settings, tenant: str) -> None:
    name = f"accept-test-{uuid.uuid4().hex[:8]}"
    queue = AmqpCommandQueue(unread.amqp_url, queue_name=unread.command_queue, name=name)
    try:
        await queue.publish([claim(tenant)])
        await asyncio.to_thread(close_connection, name)
        for _ in range(100):
            if not queue.publisher.connected:
                break
            await asyncio.sleep(0.05)
        assert not queue.publisher.connected
        await queue.publish([claim(tenant)])  # a fresh connection, the queue declared again
        assert queue.publisher.connected
        assert len(await asyncio.to_thread(drain, unread)) == 2
    finally:
        await queue.close()


async def test_concurrent_requests_are_recorded_and_queued_in_groups(
    aiohttp_client: ClientFactory, unread: Settings, ledger: LedgerService, tenant: str
) -> None:
    node = await aiohttp_client(init_app(unread))
    secret = create_api_key(ledger.pool, tenant)[1]

    async def create(n: int) -> dict[str, Any]:
        response = await node.post(
            "/v1/accounts",
            json={"currency": "USD"},
            headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": f"grouped-{n}"},
        )
        assert response.status == 202, await response.text()
        document: dict[str, Any] = await response.json()
        return document

    answers = await asyncio.gather(*(create(n) for n in range(120)))
    messages = await asyncio.to_thread(drain, unread)
    queued = [q for _, body in messages for _, q in parse_command_message(body)]
    assert sorted(str(q.operation_id) for q in queued) == sorted(a["id"] for a in answers)  # each once
    assert len(messages) < len(answers) / 2, "one message per group, not one per request"
    with psycopg.connect(unread.database_url) as conn:
        pending = conn.execute(
            "SELECT count(*) FROM idempotency_keys WHERE tenant_id = %s AND status = 'pending'", (tenant,)
        ).fetchone()
    assert pending == (120,)  # recorded, waiting for a worker


async def test_an_unconfirmed_group_answers_503_and_records_nothing(
    aiohttp_client: ClientFactory, unread: Settings, ledger: LedgerService, tenant: str
) -> None:
    node = await aiohttp_client(init_app(unread))
    secret = create_api_key(ledger.pool, tenant)[1]

    async def create(key: str) -> tuple[int, dict[str, Any], str | None]:
        response = await node.post(
            "/v1/accounts",
            json={"currency": "USD"},
            headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": key},
        )
        return response.status, await response.json(content_type=None), response.headers.get("Retry-After")

    assert (await create("warm-up"))[0] == 202  # the node's channel is open and its queue declared
    await asyncio.to_thread(delete_queues, unread)  # every publish from now on is returned unroutable
    answers = await asyncio.gather(*(create(f"refused-{n}") for n in range(20)))
    assert {(status, doc["code"]) for status, doc, _ in answers} == {(503, "service-unavailable")}
    assert all(retry_after is not None and int(retry_after) >= 1 for _, _, retry_after in answers)
    with psycopg.connect(unread.database_url) as conn:
        kept = conn.execute(
            "SELECT count(*) FROM idempotency_keys WHERE tenant_id = %s AND key LIKE 'refused-%%'", (tenant,)
        ).fetchone()
    assert kept == (0,)  # nothing half-accepted: a retry with the same key starts afresh
    assert queue_depth(unread.amqp_url, unread.command_queue) is None  # and nothing reached a queue
