"""What one ingress process holds: its adapters, opened by the app's cleanup contexts."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from core.adapters.mongo.audit import AuditReader
from core.adapters.postgres.queries import AsyncPostgresQueries
from core.adapters.rabbitmq.commands import AmqpCommandQueue
from core.adapters.redis.cache import OperationCache
from core.adapters.redis.rate_limit import TokenBucket
from core.adapters.redis.revocations import RevocationListener
from core.adapters.redis.waiter import SettlementWaiter
from core.application.accept import Acceptance
from core.application.ports import OperationRecords, RequestTrail
from core.bootstrap import LedgerService
from core.settings import Settings
from ingress.health import Readiness

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """Networks from a comma-separated list such as `127.0.0.1/32,::1/128`; a bare address is a network of one."""
    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in spec.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"CLEANLEDGER_TRUSTED_PROXIES: {exc}") from None


@dataclass
class Ingress:
    """Adapters are set by the app's cleanup contexts (ingress/app.py) before the first request."""

    settings: Settings
    executor: ThreadPoolExecutor
    node: str  # host:port, as the audit trail names the node that answered
    ledger: LedgerService = field(init=False)  # blocking reads (accounts, entries, webhooks), on `executor`
    database: AsyncConnectionPool = field(init=False)  # the event loop's PostgreSQL
    records: OperationRecords = field(init=False)  # operations pending or settled, read on the event loop
    queries: AsyncPostgresQueries = field(init=False)  # accounts and entries, read on the event loop
    queue: AmqpCommandQueue = field(init=False)
    acceptance: Acceptance = field(init=False)  # POSTs of commands
    cache: OperationCache = field(init=False)
    limiter: TokenBucket = field(init=False)  # requests per API key
    auth_limiter: TokenBucket = field(init=False)  # uncached API-key lookups per client address
    waiter: SettlementWaiter = field(init=False)
    revocations: RevocationListener = field(init=False)
    readiness: Readiness = field(init=False)  # GET /readyz
    audit: AuditReader = field(init=False)  # GET /v1/operations/{id}/audit
    openapi: bytes | None = None  # GET /v1/openapi.json, generated on its first request
    trail: RequestTrail | None = field(init=False)  # every mutating request, answered (None: audit_requests off)
    # Parsed from settings.trusted_proxies once, so a malformed setting fails at start, not per request.
    trusted_proxies: tuple[IPNetwork, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.trusted_proxies = parse_networks(self.settings.trusted_proxies)

    async def blocking(self, fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
        """Run a blocking call (the sync read adapters) on the bounded pool, never on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


INGRESS = web.AppKey("ingress", Ingress)
