"""The one settings object. Every value comes from a CLEANLEDGER_* environment variable, with a default
that works against this machine's local services."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Self, get_type_hints


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/cleanledger"
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    mongo_url: str = "mongodb://127.0.0.1:27017/cleanledger"
    db_pool_min: int = 2  # connections kept open per process
    db_pool_max: int = 16  # connections at most per process
    db_statement_timeout_ms: int = 5000  # a stuck statement fails instead of holding locks forever
    db_lock_timeout_ms: int = 3000  # waiting longer than this for a row lock counts as a conflict
    # A client that stalls mid-transaction (stopped, swapping, a hung broker call) is cut off after this long,
    # so the rows it locked do not block every other writer of those accounts; milliseconds.
    db_idle_in_transaction_timeout_ms: int = 15_000
    # --- ingress -------------------------------------------------------------------------------------------
    ingress_host: str = "127.0.0.1"
    ingress_port: int = 8081
    ingress_db_threads: int = 4  # threads for the blocking reads not yet on the async pool, per process
    # Async PostgreSQL connections per ingress process: the accept phase's record statements, API-key lookups
    # and operation reads. Two of them write records (one group each); the rest read.
    ingress_db_connections: int = 4
    accept_group_max: int = 256  # pending operations recorded by one statement and commit at most
    max_body_bytes: int = 64 * 1024  # larger request bodies get 413
    # A body still arriving after this long gets 408, so a client trickling bytes cannot hold a request (and its
    # memory) forever; seconds. nginx has its own, shorter per-read timeout in front.
    body_read_timeout_s: float = 10.0
    # Peers whose X-Forwarded-For is believed (their last hop is the client address): comma-separated networks.
    # Any other peer is itself the client, whatever it sends. The default is the local nginx.
    trusted_proxies: str = "127.0.0.1/32,::1/128"
    prefer_wait_max_s: int = 30  # cap of `Prefer: wait=N`, seconds
    rate_limit_burst: int = 200  # token-bucket capacity per API key, requests
    rate_limit_per_second: float = 100.0  # token refill per API key, requests per second
    api_key_cache_s: float = 30.0  # how long an ingress trusts a resolved API key (revocation delay), seconds
    # Lookups of API keys an ingress has not cached (unknown secrets, mostly) cost a PostgreSQL query each:
    # a token bucket per client address bounds them.
    auth_lookup_burst: int = 100  # bucket capacity per client address, lookups
    auth_lookup_per_second: float = 10.0  # refill per client address, lookups per second
    idempotency_cache_s: int = 24 * 3600  # Redis copy of key -> operation, seconds
    result_cache_s: int = 3600  # Redis copy of a settled operation, seconds
    broker_retry_after_s: int = 5  # Retry-After sent with 503 when RabbitMQ is unreachable, seconds
    # --- workers -------------------------------------------------------------------------------------------
    command_queue: str = "ledger.commands"
    events_exchange: str = "ledger.events"  # the topic exchange the relay publishes ledger events to
    request_exchange: str = "ledger.requests"  # where direct AMQP producers publish commands
    request_queue: str = "ledger.requests"  # the workers' queue bound to it, one routing key per command type
    audit_queue: str = "ledger.audit"  # the audit consumer's queue, bound to every ledger event
    audit_group_max: int = 500  # events written to the audit store in one insert_many at most
    worker_max_retries: int = 8  # later tries of a command that failed on its own, before it is given up
    worker_min_backoff_ms: int = 200  # first retry delay, milliseconds (doubles, jittered)
    worker_max_backoff_ms: int = 30_000  # retry delay cap, milliseconds
    worker_group_max: int = 256  # commands settled in one transaction at most (group commit)
    # After a worker takes a first command it waits this long for more to join its group, milliseconds: the
    # most a lone command is delayed by grouping.
    worker_group_wait_ms: float = 2.0
    redeliver_after_s: int = 120  # a pending operation this old without a settlement is enqueued again
    outbox_retention_s: int = 24 * 3600  # published events stay in the outbox this long, then the relay prunes them
    # --- webhooks (workers/webhooks.py) --------------------------------------------------------------------
    webhook_queue: str = "ledger.webhooks"  # durable queue bound to `ledger.events` ('#') feeding the fan-out
    webhook_timeout_s: float = 5.0  # one delivery attempt's whole HTTP exchange, seconds
    webhook_retry_window_s: int = 24 * 3600  # a delivery is retried this long after it was created, seconds
    webhook_backoff_min_s: float = 5.0  # ceiling of the first retry's jittered delay, seconds (doubles)
    webhook_backoff_max_s: float = 3600.0  # cap of a retry delay, seconds
    webhook_concurrency: int = 64  # HTTP attempts in flight per webhook worker process
    webhook_endpoint_concurrency: int = 4  # of which at most this many to any one endpoint
    webhook_poll_s: float = 1.0  # the delivery loop looks for due retries at least this often, seconds
    # CIDR networks (comma separated) webhooks may reach although private, loopback or link-local; empty: none.
    webhook_allowed_networks: str = ""
    log_level: str = "INFO"
    log_json: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Self:
        """Settings from `CLEANLEDGER_<FIELD>` variables (e.g. CLEANLEDGER_DATABASE_URL), then `overrides`."""
        env = os.environ if environ is None else environ
        types = get_type_hints(cls)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"CLEANLEDGER_{f.name.upper()}")
            if raw is None:
                continue
            kind = types[f.name]
            if kind is bool:
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"CLEANLEDGER_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
