"""aiohttp app factory and entry point of one stateless ingress node (`python -m ingress.app --port N`)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from core.adapters.mongo.audit import AuditReader
from core.adapters.postgres.queries import AsyncPostgresQueries, ledger_id
from core.adapters.redis.revocations import RevocationListener
from core.bootstrap import (
    acceptance,
    bootstrap,
    command_queue,
    ingress_database,
    ingress_redis,
    operation_records,
    request_trail,
)
from core.entrypoint import parser_for, tune_garbage_collector
from core.logs import configure_logging
from core.settings import Settings, settings_or_exit
from ingress.context import INGRESS, Ingress
from ingress.health import Readiness
from ingress.middleware import (
    API_KEY_CACHE,
    ApiKeyCache,
    authenticate,
    install_problem_error_handler,
    problems,
    record_requests,
    request_context,
)
from ingress.routes import routes

# Seconds a stopping node gives its slowest request beyond the longest `Prefer: wait`.
SHUTDOWN_MARGIN_S = 5


async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[INGRESS].executor.shutdown(wait=True, cancel_futures=True)


async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    size = ingress.settings.ingress_db_threads
    ingress.ledger = await ingress.blocking(bootstrap, ingress.settings, pool_size=size)
    yield
    await ingress.blocking(ingress.ledger.close)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    ingress.database = await ingress_database(ingress.settings)
    ingress.records = operation_records(ingress.database)
    ingress.queries = AsyncPostgresQueries(ingress.database)
    yield
    await ingress.database.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    redis = ingress_redis(ingress.settings, ledger=await ingress.blocking(ledger_id, ingress.ledger.pool))
    ingress.cache, ingress.waiter = redis.cache, redis.waiter
    ingress.limiter, ingress.auth_limiter = redis.limiter, redis.auth_limiter
    await ingress.waiter.start()
    api_keys = app[API_KEY_CACHE]
    ingress.revocations = RevocationListener(redis.client, on_revoked=api_keys.forget, on_resync=api_keys.forget_all)
    await ingress.revocations.start()
    ingress.readiness = Readiness(ingress.settings, redis.client)
    yield
    ingress.readiness.close()
    await ingress.revocations.close()
    await redis.close()


async def broker_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    ingress.queue = command_queue(ingress.settings)
    yield
    await ingress.queue.close()


async def trail_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    ingress.trail = request_trail(ingress.settings, node=ingress.node)
    yield
    if ingress.trail is not None:
        await ingress.trail.close()


async def acceptance_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    ingress.acceptance = acceptance(ingress.settings, records=ingress.records, queue=ingress.queue, cache=ingress.cache)
    yield
    await ingress.acceptance.close()


async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    ingress.audit = AuditReader(ingress.settings.mongo_url)  # connects lazily: MongoDB down never stops a node
    yield
    await ingress.audit.close()


def init_app(settings: Settings, *, node: str | None = None) -> web.Application:
    """node: how the audit trail names this node (default: host name and the configured port)."""
    install_problem_error_handler()  # requests aiohttp itself refuses get problem documents too
    app = web.Application(
        middlewares=[request_context, record_requests, problems, authenticate],
        client_max_size=max(settings.max_body_bytes, settings.max_batch_body_bytes),  # each route caps its own
    )
    app[INGRESS] = Ingress(
        settings,
        ThreadPoolExecutor(max_workers=settings.ingress_db_threads, thread_name_prefix="ingress-io"),
        node or f"{socket.gethostname()}:{settings.ingress_port}",
    )
    app[API_KEY_CACHE] = ApiKeyCache(settings.api_key_cache_s)
    app.cleanup_ctx.extend(
        [
            executor_ctx,
            ledger_ctx,
            database_ctx,
            redis_ctx,
            broker_ctx,
            trail_ctx,
            acceptance_ctx,
            audit_ctx,
        ]
    )
    app.add_routes(routes)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = parser_for("ingress", "Clean Ledger HTTP ingress node")
    parser.add_argument("--host", help="overrides CLEANLEDGER_INGRESS_HOST")
    parser.add_argument("--port", type=int, help="overrides CLEANLEDGER_INGRESS_PORT")
    args = parser.parse_args(argv)
    settings = settings_or_exit("ingress")
    configure_logging(level=settings.log_level, json=settings.log_json)
    tune_garbage_collector()
    port = args.port or settings.ingress_port
    web.run_app(
        init_app(settings, node=f"{socket.gethostname()}:{port}"),
        host=args.host or settings.ingress_host,
        port=port,
        access_log=None,  # request_context logs every request as JSON with its request id
        print=None,
        # SIGTERM: stop listening, let the requests in flight finish (a `Prefer: wait` one may hold for up to
        # prefer_wait_max_s), then close the adapters. supervisord's stopwaitsecs is longer than this.
        shutdown_timeout=settings.prefer_wait_max_s + SHUTDOWN_MARGIN_S,
    )


if __name__ == "__main__":
    main()
