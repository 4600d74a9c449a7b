"""The one place that opens Redis connections.

Redis is only a speed-up here (PostgreSQL is the truth), so clients are built to fail fast: short timeouts and a
single immediate retry (enough to replace a pooled connection the server closed), never seconds of backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

CONNECT_TIMEOUT_S = 0.25  # seconds, to open a TCP connection
SOCKET_TIMEOUT_S = 0.25  # seconds, to send a command and read its reply
RETRIES = 1  # extra tries of a failed command, at once (no backoff)
# RESP2, not redis-py 8's default RESP3: under RESP3 a pub/sub message is a push, and redis-py builds the
# str() of every push for a debug log line before the level is checked. A batch's settlement announcement is
# 300 KB, and every ingress node receives each one: that str() was an eighth of a node's CPU (py-spy). Nothing
# here needs RESP3.
PROTOCOL = 2

# What "Redis unavailable" looks like: redis-py's own errors (its ConnectionError and TimeoutError included)
# and the OS-level ones (builtin ConnectionError / TimeoutError are OSError subclasses).
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


def async_client(url: str) -> redis.asyncio.Redis:
    """A pooled asyncio client, for the aiohttp ingress. The caller owns it (`await client.aclose()`)."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        retry=AsyncRetry(NoBackoff(), RETRIES),
        decode_responses=False,
        protocol=PROTOCOL,
    )


def sync_client(url: str) -> redis.Redis:
    """A pooled blocking client, for the Dramatiq workers. The caller owns it (`client.close()`)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), RETRIES),
        decode_responses=False,
        protocol=PROTOCOL,
    )


def describe(error: BaseException) -> str:
    """For logs: redis-py's own repr() of its errors drops the message."""
    return f"{type(error).__name__}: {error}"


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel pub/sub reader tasks and wait until they have ended.

    Cancelling once is not enough: a cancellation that lands while redis-py's `get_message(timeout=...)` is
    timing out its read can be swallowed, and the reader then runs on (seen as an app shutdown hanging until
    some message or reconnection happened to end the read). So cancel again until every task is done.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
