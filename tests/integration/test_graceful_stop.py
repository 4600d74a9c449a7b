"""SIGTERM is a graceful stop: an ingress node answers every request it took, a worker finishes its group."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from typing import Any

import aiohttp
import pika
import psycopg

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.queries import ledger_id
from core.adapters.rabbitmq.commands import CommandPublisher
from core.adapters.redis.cache import OperationCache
from core.adapters.redis.client import async_client
from core.application.commands import Credit
from core.application.views import OperationStatus
from core.bootstrap import LedgerService
from core.domain.ids import new_id
from core.domain.money import Money
from core.settings import Settings
from tests.helpers import balance, open_account, record_pending
from tests.integration.test_worker_failures import wait_for_lock_waiter, wait_until_settled
from tests.processes import ManagedProcess, free_port, ingress_command, settings_env, worker_command
from tests.services import delete_queues

IN_FLIGHT = 8


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except (ConnectionRefusedError, ConnectionResetError):  # reset: the listening socket closed under the SYN
        return True


async def accepted(cache: OperationCache, tenant: str, keys: list[str]) -> int:
    """Requests whose command RabbitMQ confirmed: the ingress notes each such key in Redis right after."""
    return sum([await cache.lookup_key(tenant, key) is not None for key in keys])


def queued(settings: Settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        declared = connection.channel().queue_declare(settings.command_queue, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


async def test_sigterm_on_an_ingress_answers_every_request_in_flight(
    settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    # A queue no worker reads yet: the requests stay in flight, waiting (Prefer: wait), until we start one.
    private = settings.replace(command_queue=f"{settings.command_queue}.graceful")
    env = settings_env(private)
    port = free_port()
    secret = create_api_key(ledger.pool, tenant)[1]
    account = await asyncio.to_thread(open_account, ledger, tenant)
    redis_client = async_client(settings.redis_url)
    try:
        with ManagedProcess.start(ingress_command(port), env=env, name="stopping-ingress", port=port) as node:

            async def credit(session: aiohttp.ClientSession, i: int) -> tuple[int, dict[str, Any]]:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/credits",
                    json={"account_id": str(account), "amount": 100 + i, "currency": "USD"},
                    headers={"Idempotency-Key": f"graceful-{i}", "Prefer": "wait=20"},
                ) as response:
                    return response.status, await response.json(content_type=None)

            headers = {"Authorization": f"Bearer {secret}"}
            cache = OperationCache(redis_client, ledger_id=ledger_id(ledger.pool))
            async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
                requests = [asyncio.create_task(credit(session, i)) for i in range(IN_FLIGHT)]
                deadline = time.monotonic() + 20
                keys = [f"graceful-{i}" for i in range(IN_FLIGHT)]
                while await accepted(cache, tenant, keys) < IN_FLIGHT:
                    assert time.monotonic() < deadline, "the requests were not all accepted"
                    await asyncio.sleep(0.05)
                node.popen.send_signal(signal.SIGTERM)  # every request is now waiting for its settlement
                deadline = time.monotonic() + 10
                while not await asyncio.to_thread(refuses_connections, port):
                    assert time.monotonic() < deadline, "a stopping node still takes new connections"
                    await asyncio.sleep(0.05)
                assert node.popen.poll() is None, "it waits for the requests in flight"
                assert not any(r.done() for r in requests)
                with ManagedProcess.start(worker_command(), env=env, name="graceful-worker"):
                    answers = await asyncio.gather(*requests)
                    exit_code = await asyncio.to_thread(node.popen.wait, 30)
        assert [status for status, _ in answers] == [201] * IN_FLIGHT, answers
        assert all(doc["status"] == "succeeded" for _, doc in answers)
        assert exit_code == 0, node.output()[-2000:]
        assert await asyncio.to_thread(balance, ledger, tenant, account) == sum(100 + i for i in range(IN_FLIGHT))
    finally:
        await redis_client.aclose()
        delete_queues(private)


def test_sigterm_on_a_worker_finishes_and_acknowledges_its_group(
    settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    private = settings.replace(command_queue=f"{settings.command_queue}.sigterm")
    account = open_account(ledger, tenant)
    operation_id = new_id()
    command = Credit(tenant, account, Money.for_posting(777, "USD"))
    record_pending(ledger, command, "sigterm-mid-group", operation_id)
    try:
        with psycopg.connect(settings.database_url) as blocker:
            # Hold the account's row lock: the worker's group transaction starts, then waits inside it.
            blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))
            with ManagedProcess.start(worker_command(), env=settings_env(private), name="sigterm-worker") as worker:
                publisher = CommandPublisher(private.amqp_url, queue_name=private.command_queue)
                try:
                    publisher.publish(operation_id=operation_id, idempotency_key="sigterm-mid-group", command=command)
                finally:
                    publisher.close()
                wait_for_lock_waiter(settings, blocker.info.backend_pid)
                worker.popen.send_signal(signal.SIGTERM)  # mid-group
                time.sleep(0.5)
                assert worker.popen.poll() is None, "it does not walk away from its group"
                blocker.rollback()  # the lock goes: the group commits
                with contextlib.suppress(Exception):
                    worker.popen.wait(20)
                assert worker.popen.returncode == 0, worker.output()[-2000:]
        settled = wait_until_settled(ledger, tenant, operation_id, 0)
        assert settled.status is OperationStatus.SUCCEEDED, "settled by the stopping worker itself"
        assert balance(ledger, tenant, account) == 777
        assert queued(private) == 0, "and acknowledged: nothing is delivered again"
    finally:
        delete_queues(private)
