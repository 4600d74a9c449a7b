"""Prometheus metrics of every process kind besides the ingress (which serves its own at /metrics): a worker,
the relay, the redelivery sweeper, the webhook worker and the audit consumer, each started as the Procfile starts
it with `--metrics-port`, show what they did for a few real requests."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from core.adapters.postgres.api_keys import create_api_key
from core.bootstrap import LedgerService
from core.settings import Settings
from ingress.app import init_app
from tests.integration.test_audit import MongoServer
from tests.processes import BIN, ManagedProcess, free_port, settings_env, worker_command
from tests.services import delete_queues, private_queues

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
SCRAPE_WAIT_S = 30.0


def sample(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus' text format (`name{labels} value`), None when absent."""
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def scrape_until(port: int, name: str, labels: str = "", *, at_least: float = 0.0) -> float:
    """Scrape 127.0.0.1:port/metrics until the sample is there with at least that value."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    value: float | None = None
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as answer:
                    value = sample(await answer.text(), name, labels)
            except aiohttp.ClientError:
                value = None  # not listening yet
            if value is not None and value >= at_least:
                return value
            await asyncio.sleep(0.2)
    raise AssertionError(f"{name}{labels} on :{port} is {value}, not >= {at_least}")


@pytest.fixture
async def receiver() -> AsyncIterator[str]:
    app = web.Application()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def test_every_process_kind_serves_what_it_did(
    aiohttp_client: ClientFactory, settings: Settings, ledger: LedgerService, tenant: str, receiver: str
) -> None:
    mongo = MongoServer()
    mongo.start()
    own = private_queues(
        settings, f"metrics{uuid.uuid4().hex[:6]}", mongo_url=mongo.url, webhook_allowed_networks="127.0.0.0/8"
    )
    env = settings_env(own)
    ports = {kind: free_port() for kind in ("worker", "relay", "redeliver", "webhooks", "audit")}

    def process(kind: str, command: list[str]) -> ManagedProcess:
        return ManagedProcess.start([*command, "--metrics-port", str(ports[kind])], env=env, name=f"metrics-{kind}")

    python = str(BIN / "python")
    try:
        with (
            process("worker", worker_command()),
            process("relay", [python, "-m", "workers.relay", "--poll-interval", "0.5"]),
            process("redeliver", [python, "-m", "workers.redeliver"]),
            process("webhooks", [python, "-m", "workers.webhooks"]),
            process("audit", [python, "-m", "workers.audit"]),
        ):
            secret = create_api_key(ledger.pool, tenant)[1]
            node = await aiohttp_client(init_app(own))
            auth = {"Authorization": f"Bearer {secret}"}
            hook = await node.post("/v1/webhook-endpoints", json={"url": receiver, "event_types": ["*"]}, headers=auth)
            assert hook.status == 201
            for _ in range(3):
                answer = await node.post(
                    "/v1/accounts",
                    json={"currency": "USD"},
                    headers={**auth, "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=10"},
                )
                assert answer.status == 201
            worker, relay, redeliver = ports["worker"], ports["relay"], ports["redeliver"]
            await scrape_until(worker, "cleanledger_operations_settled_total", '{outcome="succeeded"}', at_least=3)
            await scrape_until(worker, "cleanledger_worker_group_commands_count", at_least=1)
            await scrape_until(worker, "cleanledger_serialization_retries_total", '{result="retried"}')
            await scrape_until(relay, "cleanledger_outbox_published_total", at_least=3)
            await scrape_until(relay, "cleanledger_outbox_backlog_events")
            await scrape_until(redeliver, "cleanledger_pending_operation_oldest_seconds")
            dead_letters = f'{{queue="{own.command_queue}.XQ"}}'
            await scrape_until(redeliver, "cleanledger_dead_letter_messages", dead_letters)
            await scrape_until(
                ports["webhooks"], "cleanledger_webhook_attempts_total", '{outcome="succeeded"}', at_least=3
            )
            await scrape_until(ports["audit"], "cleanledger_audit_records_written_total", at_least=3)
    finally:
        delete_queues(own)
        mongo.stop()
