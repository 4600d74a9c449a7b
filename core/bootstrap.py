"""Composition root: wires the adapters (PostgreSQL, Redis, RabbitMQ, MongoDB) to the use cases. Both entry
points (ingress, workers) and the tests build the ledger through `bootstrap()`, and the ingress's accept phase
through `acceptance()`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

import redis.asyncio
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from core.adapters.mongo.audit import MongoAuditStore
from core.adapters.net import SystemResolver
from core.adapters.postgres.db import open_async_pool, open_pool
from core.adapters.postgres.operations import PostgresOperationRecords
from core.adapters.postgres.queries import PostgresQueries
from core.adapters.postgres.uow import PostgresUnitOfWork
from core.adapters.postgres.webhooks import PostgresWebhooks
from core.adapters.rabbitmq.commands import AmqpCommandQueue, CommandPublisher, retry_delays_ms
from core.adapters.rabbitmq.consumer import CommandConsumer, EventConsumer
from core.adapters.rabbitmq.trail import AmqpRequestTrail
from core.adapters.redis.cache import OperationCache, RedisQueuedKeys, SettlementPublisher
from core.adapters.redis.client import async_client, sync_client
from core.adapters.redis.rate_limit import TokenBucket
from core.adapters.redis.waiter import SettlementWaiter
from core.application import group_commit, handlers
from core.application.accept import Acceptance
from core.application.commands import Command
from core.application.group_commit import Outcome, Unsettled
from core.application.ports import CommandQueue, OperationRecords, RequestTrail, Submission
from core.application.requests import BODIES
from core.application.retry import RetryPolicy
from core.application.settle import Clock, utc_now
from core.application.views import OperationResult
from core.application.webhooks import WebhookService
from core.domain.errors import LedgerError
from core.domain.ids import new_id
from core.domain.webhooks import parse_networks
from core.settings import Settings


@dataclass
class LedgerService:
    """The ledger's use cases bound to their adapters."""

    settings: Settings
    pool: ConnectionPool
    queries: PostgresQueries
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    webhooks: WebhookService = field(init=False)

    def __post_init__(self) -> None:
        self.webhooks = webhook_service(self.settings, self.pool)

    def unit_of_work(self) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(self.pool)

    def execute(self, command: Command, *, idempotency_key: str, operation_id: UUID | None = None) -> OperationResult:
        """Run a command exactly once for its (tenant, key), retrying serialization conflicts."""
        return handlers.run(
            command,
            uow_factory=self.unit_of_work,
            idempotency_key=idempotency_key,
            operation_id=operation_id,
            retry=self.retry,
        )

    def settle_group(self, submissions: Sequence[Submission], clock: Clock = utc_now) -> list[Outcome]:
        """Settle many commands with one commit (group commit); a failing one is isolated, see `settle_group`.
        `clock`: the settlement's time, the wall clock's but when replaying."""
        return group_commit.settle_group(submissions, uow_factory=self.unit_of_work, retry=self.retry, clock=clock)

    def execute_many(self, items: Sequence[tuple[Command, str]]) -> list[OperationResult]:
        """Run many (command, idempotency key) pairs with one commit, answering in their order; for benchmarks
        and bulk loads. Raises the first error that is not an outcome (a reused key, a command that failed)."""
        outcomes = self.settle_group([Submission(command, key, new_id()) for command, key in items])
        results: list[OperationResult] = []
        for outcome in outcomes:
            if isinstance(outcome, Unsettled):
                raise outcome.error
            if isinstance(outcome, LedgerError):
                raise outcome
            results.append(outcome)
        return results

    def give_up(
        self, command: Command, *, idempotency_key: str, operation_id: UUID, error: LedgerError
    ) -> OperationResult:
        return self.retry.run(
            lambda: handlers.give_up(
                command,
                uow=self.unit_of_work(),
                idempotency_key=idempotency_key,
                operation_id=operation_id,
                error=error,
            ),
            what="give-up",
        )

    def close(self) -> None:
        self.pool.close()


def webhook_service(settings: Settings, pool: ConnectionPool) -> WebhookService:
    """Webhook endpoints, deliveries and the event feed, with the SSRF allow-list of `settings`."""
    return WebhookService(
        PostgresWebhooks(pool),
        SystemResolver(),
        allowed_networks=parse_networks(settings.webhook_allowed_networks),
        retry_window_s=settings.webhook_retry_window_s,
    )


def bootstrap(
    settings: Settings | None = None, *, pool_size: int | None = None, retry: RetryPolicy | None = None
) -> LedgerService:
    settings = settings or Settings.from_env()
    pool = open_pool(settings, min_size=min(2, pool_size or 2), max_size=pool_size)
    return LedgerService(settings, pool, PostgresQueries(pool), retry or RetryPolicy())


def audit_store(settings: Settings) -> MongoAuditStore:
    """The audit trail's store (MongoDB at `CLEANLEDGER_MONGO_URL`)."""
    return MongoAuditStore(settings.mongo_url)


async def ingress_database(settings: Settings) -> AsyncConnectionPool:
    """The ingress's asyncio PostgreSQL pool (its accept phase, API keys, operation reads)."""
    return await open_async_pool(settings, max_size=settings.ingress_db_connections)


def command_queue(settings: Settings) -> AmqpCommandQueue:
    """The ingress's command queue: RabbitMQ, confirms pipelined; it connects on first use."""
    return AmqpCommandQueue(settings.amqp_url, queue_name=settings.command_queue)


def request_trail(settings: Settings, *, node: str) -> RequestTrail | None:
    """Where an ingress node sends the records of the requests it answered (None: `audit_requests` is off)."""
    if not settings.audit_requests:
        return None
    return AmqpRequestTrail(
        settings.amqp_url,
        queue=settings.audit_queue,
        exchange=settings.events_exchange,
        wait_s=settings.audit_request_wait_ms / 1000,
        name=f"cleanledger request trail {node}",
    )


def operation_records(database: AsyncConnectionPool) -> PostgresOperationRecords:
    return PostgresOperationRecords(database)


def acceptance(
    settings: Settings, *, records: OperationRecords, queue: CommandQueue, cache: OperationCache
) -> Acceptance:
    """The accept use case on the ingress's adapters (call inside its event loop)."""
    return Acceptance(
        records=records,
        queue=queue,
        queued_keys=RedisQueuedKeys(cache, ttl_s=settings.idempotency_cache_s),
        max_group=settings.accept_group_max,
        writers=max(1, min(2, settings.ingress_db_connections - 1)),
        retry_after_s=settings.broker_retry_after_s,
    )


# --- Redis, for the ingress -------------------------------------------------------------------------------------
@dataclass
class IngressRedis:
    """An ingress's Redis adapters on one asyncio client: the operation cache, the two token buckets and the
    settlement waiter (`await waiter.start()` before serving, `close()` at shutdown)."""

    client: redis.asyncio.Redis
    cache: OperationCache
    limiter: TokenBucket  # requests per API key
    auth_limiter: TokenBucket  # uncached API-key lookups per client address
    waiter: SettlementWaiter

    async def close(self) -> None:
        await self.waiter.close()
        await self.client.aclose()


def ingress_redis(settings: Settings, *, ledger: str) -> IngressRedis:
    """`ledger` is the database's `ledger_instance` id, which namespaces the idempotency-key copies."""
    client = async_client(settings.redis_url)
    return IngressRedis(
        client,
        OperationCache(client, ledger_id=ledger),
        TokenBucket(client, capacity=settings.rate_limit_burst, refill_per_second=settings.rate_limit_per_second),
        TokenBucket(client, capacity=settings.auth_lookup_burst, refill_per_second=settings.auth_lookup_per_second),
        SettlementWaiter(client),
    )


# --- RabbitMQ and Redis, for the workers --------------------------------------------------------------------------
def command_consumer(settings: Settings) -> CommandConsumer:
    """The command worker's queues: the ingress's command queue and the direct producers' request queue."""
    return CommandConsumer(
        settings.amqp_url,
        queue_name=settings.command_queue,
        retry_delays_ms=retry_delays_ms(
            max_retries=settings.worker_max_retries,
            min_backoff_ms=settings.worker_min_backoff_ms,
            max_backoff_ms=settings.worker_max_backoff_ms,
        ),
        group_max=settings.worker_group_max,
        group_wait_s=settings.worker_group_wait_ms / 1000,
        prefetch=2 * settings.worker_group_max,
        request_exchange=settings.request_exchange,
        request_queue=settings.request_queue,
        request_types=list(BODIES),
    )


def settlement_publisher(settings: Settings) -> SettlementPublisher:
    """Where a worker caches settled results and announces them to the waiting ingresses."""
    return SettlementPublisher(sync_client(settings.redis_url))


def event_consumer(settings: Settings, *, queue: str, group_max: int, group_wait_s: float) -> EventConsumer:
    """A consumer of every ledger event through a durable queue of its own (the audit trail's, the webhooks')."""
    return EventConsumer(
        settings.amqp_url,
        exchange=settings.events_exchange,
        queue_name=queue,
        group_max=group_max,
        group_wait_s=group_wait_s,
        prefetch=2 * group_max,
    )


def redelivery_publisher(settings: Settings) -> CommandPublisher:
    """The sweeper's blocking publisher of single commands, confirmed one by one (it sends few)."""
    return CommandPublisher(settings.amqp_url, queue_name=settings.command_queue)
