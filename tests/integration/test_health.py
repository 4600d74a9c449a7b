"""GET /healthz (alive) and GET /readyz (PostgreSQL and RabbitMQ reachable; Redis only degrades) of an ingress."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient

from core.bootstrap import LedgerService
from core.settings import Settings
from ingress import health
from ingress.app import init_app
from ingress.context import INGRESS
from ingress.health import Readiness

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
CLOSED_PORT_AMQP = "amqp://guest:guest@127.0.0.1:1/%2F"
CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"
CLOSED_PORT_POSTGRES = "postgresql://postgres@127.0.0.1:1/cleanledger"


async def test_healthz_and_readyz_need_no_api_key(aiohttp_client: ClientFactory, settings: Settings) -> None:
    node = await aiohttp_client(init_app(settings))
    response = await node.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    response = await node.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "ready",
        "checks": {"postgres": "ok", "rabbitmq": "ok", "redis": "ok"},
    }


async def test_redis_down_is_degraded_but_ready(aiohttp_client: ClientFactory, settings: Settings) -> None:
    node = await aiohttp_client(init_app(settings.replace(redis_url=CLOSED_PORT_REDIS)))
    response = await node.get("/readyz")
    assert response.status == 200
    assert (await response.json())["checks"] == {"postgres": "ok", "rabbitmq": "ok", "redis": "degraded"}


async def test_rabbitmq_down_is_503_problem(aiohttp_client: ClientFactory, settings: Settings) -> None:
    node = await aiohttp_client(init_app(settings.replace(amqp_url=CLOSED_PORT_AMQP)))
    response = await node.get("/readyz")
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert int(response.headers["Retry-After"]) >= 1
    doc = await response.json(content_type=None)
    assert doc["code"] == "service-unavailable"
    assert doc["checks"] == {"postgres": "ok", "rabbitmq": "unreachable", "redis": "ok"}
    assert (await node.get("/healthz")).status == 200, "alive all the same"


async def test_postgres_down_is_503_problem_within_the_timeout(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    node = await aiohttp_client(init_app(settings))
    ingress = node.app[INGRESS]  # type: ignore[index]
    # The node started against a working database; from now on its readiness checks find none.
    ingress.readiness.close()
    down = settings.replace(database_url=CLOSED_PORT_POSTGRES)
    ingress.readiness = Readiness(down, ingress.readiness.redis)
    started = asyncio.get_running_loop().time()
    response = await node.get("/readyz")
    assert response.status == 503
    assert asyncio.get_running_loop().time() - started < health.CHECK_TIMEOUT_S + 1
    assert (await response.json(content_type=None))["checks"]["postgres"] == "unreachable"


async def test_concurrent_probes_share_one_round_of_checks(aiohttp_client: ClientFactory, settings: Settings) -> None:
    node = await aiohttp_client(init_app(settings))
    readiness = node.app[INGRESS].readiness  # type: ignore[index]
    rounds = 0
    check_all = readiness._check_all

    async def counted() -> dict[str, health.State]:
        nonlocal rounds
        rounds += 1
        return await check_all()

    readiness._check_all = counted  # type: ignore[method-assign]
    answers = await asyncio.gather(*(node.get("/readyz") for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert rounds == 1


async def test_metrics_count_requests_accepts_and_confirms(
    aiohttp_client: ClientFactory, settings: Settings, ledger: LedgerService, tenant: str
) -> None:
    from core.adapters.postgres.api_keys import create_api_key

    node = await aiohttp_client(init_app(settings))

    async def sample(name: str, **labels: str) -> float:
        """The value of the sample `name` with exactly these labels (0 when it is not there yet)."""
        text = await (await node.get("/metrics")).text()
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            metric, _, label_text = series.partition("{")
            found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
            if metric == name and found == labels:
                return float(value)
        return 0.0

    response = await node.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    key = create_api_key(ledger.pool, tenant)[1]
    before = await sample("cleanledger_operations_accepted_total", outcome="new")
    confirms = await sample("cleanledger_publish_confirm_seconds_count", result="confirmed")
    requests = await sample("cleanledger_http_request_seconds_count", route="/v1/accounts", method="POST", status="202")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "metrics-1"}
    assert (await node.post("/v1/accounts", json={"currency": "USD"}, headers=headers)).status == 202
    assert await sample("cleanledger_operations_accepted_total", outcome="new") == before + 1
    assert await sample("cleanledger_publish_confirm_seconds_count", result="confirmed") == confirms + 1
    after = await sample("cleanledger_http_request_seconds_count", route="/v1/accounts", method="POST", status="202")
    assert after == requests + 1
