"""Token-bucket rate limiting per API key, atomic in one Lua script on Redis server time.

A bucket holds at most `capacity` tokens (the burst) and gains `refill_per_second` tokens a second; a request
takes `cost` tokens or is denied with the time until enough have refilled. A missing key is a full bucket, and
the key expires once it would have refilled completely, so idle buckets vanish without changing any answer.

Redis is only a speed-up: when it cannot answer, requests are let through (fail open) and a warning is logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio
import structlog

from core.adapters.redis.client import REDIS_ERRORS, describe
from core.adapters.redis.keys import rate_limit_key

log = structlog.get_logger(__name__)

# KEYS[1] = bucket key; ARGV = capacity, refill per second, cost, key TTL in ms.
# Returns {allowed (0/1), whole tokens left, microseconds until `cost` tokens are available (0 if allowed)}.
# State: hash {tokens = float, ts = server time of the last update, in microseconds}.
# Needs Redis >= 5 (effects replication, so writing after TIME is allowed).
_TAKE_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local allowed = 0
local wait_us = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_us = math.ceil((cost - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', ts)
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {allowed, math.floor(tokens), wait_us}
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    remaining: int  # whole tokens left in the bucket after this decision
    retry_after_s: float  # seconds until the denied request could pass; 0.0 when allowed


class TokenBucket:
    def __init__(self, client: redis.asyncio.Redis, *, capacity: int, refill_per_second: float) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 token")
        if not refill_per_second > 0:
            raise ValueError("refill_per_second must be positive")
        self.capacity = capacity  # tokens, the burst
        self.refill_per_second = refill_per_second  # tokens per second
        # Time for an empty bucket to refill completely, in ms (+1 s margin): after it the key is a full bucket.
        self._ttl_ms = math.ceil(capacity / refill_per_second * 1000) + 1000
        self._take = client.register_script(_TAKE_LUA)

    async def take(self, bucket_id: str, *, cost: int = 1) -> RateDecision:
        """Take `cost` tokens from the bucket `bucket_id` (an API key id). Never raises on Redis failure."""
        if not 1 <= cost <= self.capacity:
            raise ValueError(f"cost must be between 1 and the capacity ({self.capacity})")
        try:
            raw = await self._take(
                keys=[rate_limit_key(bucket_id)],
                args=[self.capacity, repr(float(self.refill_per_second)), cost, self._ttl_ms],
            )
            allowed, remaining, wait_us = (int(v) for v in raw)
        except REDIS_ERRORS as exc:
            log.warning("rate_limit.redis_unavailable", bucket_id=bucket_id, error=describe(exc))
            return RateDecision(allowed=True, remaining=self.capacity - cost, retry_after_s=0.0)
        return RateDecision(allowed=bool(allowed), remaining=remaining, retry_after_s=wait_us / 1_000_000)
