"""The one settings object. Every value comes from a CLEANLEDGER_* environment variable (pydantic-settings),
with a default that works against this machine's local services, and is validated: a misspelt boolean, an
unknown log level or a pool of -1 connections stops the process at start with the variable's name, instead of
meaning something else. The URLs may hold passwords: they are left out of every repr and error message."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda value: value.strip().upper() if isinstance(value, str) else value),
]


# What `ops/services start` found or started on this machine (the servers' URLs), for every process and command
# of this checkout, however started; a variable set in the environment wins over it. Absent elsewhere (an image).
LOCAL_ENV_FILE = Path(__file__).resolve().parent.parent / "var" / "cleanledger.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CLEANLEDGER_",
        env_file=LOCAL_ENV_FILE,
        frozen=True,
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,  # a rejected value is never echoed: it may be a secret
    )

    # The URLs may hold passwords: never in a repr.
    database_url: str = Field(default="postgresql://postgres@127.0.0.1:5432/cleanledger", repr=False)
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    amqp_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/%2F", repr=False)
    mongo_url: str = Field(default="mongodb://127.0.0.1:27017/cleanledger", repr=False)
    db_pool_min: NonNegativeInt = 2  # connections kept open per process
    db_pool_max: PositiveInt = 16  # connections at most per process
    db_statement_timeout_ms: PositiveInt = 5000  # a stuck statement fails instead of holding locks forever
    db_lock_timeout_ms: PositiveInt = 3000  # waiting longer than this for a row lock counts as a conflict
    # A client that stalls mid-transaction (stopped, swapping, a hung broker call) is cut off after this long,
    # so the rows it locked do not block every other writer of those accounts; milliseconds.
    db_idle_in_transaction_timeout_ms: PositiveInt = 15_000
    # --- ingress -------------------------------------------------------------------------------------------
    ingress_host: str = "127.0.0.1"
    ingress_port: Annotated[int, Field(gt=0, lt=65536)] = 8081
    ingress_db_threads: PositiveInt = 4  # threads for the blocking reads not yet on the async pool, per process
    # Async PostgreSQL connections per ingress process: the accept phase's record statements, API-key lookups
    # and operation reads. Two of them write records (one group each); the rest read.
    ingress_db_connections: PositiveInt = 4
    accept_group_max: PositiveInt = 256  # pending operations recorded by one statement and commit at most
    max_body_bytes: PositiveInt = 64 * 1024  # larger request bodies get 413
    max_batch_body_bytes: PositiveInt = 1024 * 1024  # the same for a batch's (POST /v1/batches), up to 1,000 commands
    # A body still arriving after this long gets 408, so a client trickling bytes cannot hold a request (and its
    # memory) forever; seconds. nginx has its own, shorter per-read timeout in front.
    body_read_timeout_s: PositiveFloat = 10.0
    # Peers whose X-Forwarded-For is believed (their last hop is the client address): comma-separated networks.
    # Any other peer is itself the client, whatever it sends. The default is the local nginx.
    trusted_proxies: str = "127.0.0.1/32,::1/128"
    prefer_wait_max_s: NonNegativeInt = 30  # cap of `Prefer: wait=N`, seconds
    rate_limit_burst: PositiveInt = 200  # token-bucket capacity per API key, requests
    rate_limit_per_second: PositiveFloat = 100.0  # token refill per API key, requests per second
    api_key_cache_s: PositiveFloat = 30.0  # how long an ingress trusts a resolved API key (revocation delay), seconds
    # Lookups of API keys an ingress has not cached (unknown secrets, mostly) cost a PostgreSQL query each:
    # a token bucket per client address bounds them.
    auth_lookup_burst: PositiveInt = 100  # bucket capacity per client address, lookups
    auth_lookup_per_second: PositiveFloat = 10.0  # refill per client address, lookups per second
    idempotency_cache_s: PositiveInt = 24 * 3600  # Redis copy of key -> operation, seconds
    result_cache_s: PositiveInt = 3600  # Redis copy of a settled operation, seconds
    broker_retry_after_s: PositiveInt = 5  # Retry-After sent with 503 when RabbitMQ is unreachable, seconds
    # --- workers -------------------------------------------------------------------------------------------
    command_queue: str = "ledger.commands"
    events_exchange: str = "ledger.events"  # the topic exchange the relay publishes ledger events to
    request_exchange: str = "ledger.requests"  # where direct AMQP producers publish commands
    request_queue: str = "ledger.requests"  # the workers' queue bound to it, one routing key per command type
    audit_queue: str = "ledger.audit"  # the audit consumer's queue, bound to every ledger event
    audit_group_max: PositiveInt = 500  # events written to the audit store in one insert_many at most
    # Every mutating request an ingress answers, accepted or refused, goes to the audit trail as received
    # (secrets cut out); false keeps only what the ledger commits (events and snapshots).
    audit_requests: bool = True
    # Longest a request waits for RabbitMQ to confirm its record before it is answered anyway (the record is
    # then published again in the background), milliseconds.
    audit_request_wait_ms: PositiveInt = 1000
    worker_max_retries: NonNegativeInt = 8  # later tries of a command that failed on its own, before it is given up
    worker_min_backoff_ms: PositiveInt = 200  # first retry delay, milliseconds (doubles, jittered)
    worker_max_backoff_ms: PositiveInt = 30_000  # retry delay cap, milliseconds
    worker_group_max: PositiveInt = 256  # commands settled in one transaction at most (group commit)
    # After a worker takes a first command it waits this long for more to join its group, milliseconds: the
    # most a lone command is delayed by grouping.
    worker_group_wait_ms: NonNegativeFloat = 2.0
    redeliver_after_s: PositiveInt = 120  # a pending operation this old without a settlement is enqueued again
    hold_expiry_interval_s: PositiveFloat = 1.0  # seconds between two looks for pending holds past their expiry
    outbox_retention_s: PositiveInt = (
        24 * 3600
    )  # published events stay in the outbox this long, then the relay prunes them
    # --- webhooks (workers/webhooks.py) --------------------------------------------------------------------
    webhook_queue: str = "ledger.webhooks"  # durable queue bound to `ledger.events` ('#') feeding the fan-out
    webhook_timeout_s: PositiveFloat = 5.0  # one delivery attempt's whole HTTP exchange, seconds
    webhook_retry_window_s: PositiveInt = 24 * 3600  # a delivery is retried this long after it was created, seconds
    webhook_backoff_min_s: PositiveFloat = 5.0  # ceiling of the first retry's jittered delay, seconds (doubles)
    webhook_backoff_max_s: PositiveFloat = 3600.0  # cap of a retry delay, seconds
    webhook_concurrency: PositiveInt = 64  # HTTP attempts in flight per webhook worker process
    webhook_endpoint_concurrency: PositiveInt = 4  # of which at most this many to any one endpoint
    webhook_poll_s: PositiveFloat = 1.0  # the delivery loop looks for due retries at least this often, seconds
    # CIDR networks (comma separated) webhooks may reach although private, loopback or link-local; empty: none.
    webhook_allowed_networks: str = ""
    log_level: LogLevel = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)
    log_json: bool = True  # true/false, 1/0, yes/no, on/off; anything else is refused

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Settings from `CLEANLEDGER_<FIELD>` variables (e.g. CLEANLEDGER_DATABASE_URL) of the process, or of
        `environ` when given, then `overrides`. Raises pydantic's `ValidationError` naming what is wrong."""
        if environ is None:
            return cls(**overrides)
        given = {name: environ.get(f"CLEANLEDGER_{name.upper()}") for name in cls.model_fields}
        # model_validate, not the constructor: it reads `environ` alone, not the process's variables too.
        return cls.model_validate({**{k: v for k, v in given.items() if v is not None}, **overrides})

    def as_environ(self) -> dict[str, str]:
        """These settings as the `CLEANLEDGER_*` variables that give them back (for the processes a test or a
        benchmark starts)."""
        return {
            f"CLEANLEDGER_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in self.model_dump().items()
        }

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated like the original (for tests and tools)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("db_pool_min must not exceed db_pool_max")
        if self.worker_min_backoff_ms > self.worker_max_backoff_ms:
            raise ValueError("worker_min_backoff_ms must not exceed worker_max_backoff_ms")
        if self.webhook_backoff_min_s > self.webhook_backoff_max_s:
            raise ValueError("webhook_backoff_min_s must not exceed webhook_backoff_max_s")
        return self


def settings_or_exit(program: str, **overrides: Any) -> Settings:
    """`Settings.from_env` for an entry point: on an invalid variable, one line per problem on stderr, naming
    the variable (never its value), and exit status 2, not a traceback."""
    try:
        return Settings.from_env(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            name = f"CLEANLEDGER_{where.upper()}" if where else "settings"
            print(f"{program}: {name}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
