"""Redis adapter: rate limiting, the operation cache and settlement notifications.

Redis is only a speed-up; PostgreSQL is the truth. Nothing here raises on a Redis failure: the rate limiter
fails open, the cache misses, publishing is skipped and waiters poll. Every such failure is logged.
"""

from core.adapters.redis.cache import CachedKey, OperationCache, SettlementPublisher
from core.adapters.redis.client import REDIS_ERRORS, async_client, sync_client
from core.adapters.redis.rate_limit import RateDecision, TokenBucket
from core.adapters.redis.waiter import SettlementWaiter

__all__ = [
    "REDIS_ERRORS",
    "CachedKey",
    "OperationCache",
    "RateDecision",
    "SettlementPublisher",
    "SettlementWaiter",
    "TokenBucket",
    "async_client",
    "sync_client",
]
