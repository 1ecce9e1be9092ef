"""Per-tenant message rate limits: a token bucket of ``messagesPerMinute`` tokens.

The bucket refills continuously at messagesPerMinute/60 per second and holds at most
messagesPerMinute tokens, so a tenant may burst a full minute's worth and then
proceeds at the steady rate. One shard keeps buckets in memory; a tenant with several
shards shares one bucket in Redis, updated by a single Lua script so that concurrent
pods cannot both spend the last token.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from waso.session_runtime import metrics

log = logging.getLogger("waso.runtime")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float
    """Seconds until a token is available (0 when allowed)."""


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated: float


def take(bucket: Bucket | None, per_minute: int, now: float) -> tuple[Bucket, Decision]:
    """Spend one token if there is one; the pure core shared by both limiters' semantics."""
    rate = per_minute / 60.0
    tokens = float(per_minute) if bucket is None else min(per_minute, bucket.tokens + (now - bucket.updated) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), Decision(True, 0.0)
    return Bucket(tokens, now), Decision(False, (1.0 - tokens) / rate)


class MemoryRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[str, Bucket] = {}

    async def acquire(self, tenant: str, per_minute: int) -> Decision:
        bucket, decision = take(self.buckets.get(tenant), per_minute, self.clock())
        self.buckets[tenant] = bucket
        return decision


# KEYS[1]: bucket hash; ARGV[1]: messages per minute. Time comes from the Redis server, so
# pods with skewed clocks agree. Returns {allowed, retry_after_ms}.
_TAKE = """
local per_minute = tonumber(ARGV[1])
local rate = per_minute / 60000.0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil then
  tokens = per_minute
else
  tokens = math.min(per_minute, tokens + (now - updated) * rate)
end
local allowed = 0
local retry = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  retry = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return {allowed, retry}
"""


class RedisRateLimiter:
    """The shared bucket; on a Redis failure it lets messages through or refuses them, as configured."""

    def __init__(self, url: str, fail_open: bool) -> None:
        import redis.asyncio as aioredis

        self.redis: Any = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.script = self.redis.register_script(_TAKE)
        self.fail_open = fail_open

    async def acquire(self, tenant: str, per_minute: int) -> Decision:
        import redis

        try:
            allowed, retry_ms = await self.script(keys=[f"waso:ratelimit:{tenant}"], args=[per_minute])
        except (redis.RedisError, OSError) as error:
            metrics.REDIS_ERRORS.labels(tenant, "ratelimit").inc()
            log.warning("rate limiter unavailable (%s): failing %s", error, "open" if self.fail_open else "closed")
            if self.fail_open:
                return Decision(True, 0.0)
            raise RateLimiterUnavailable(str(error)) from error
        return Decision(bool(allowed), math.ceil(int(retry_ms) / 1000) if not allowed else 0.0)

    async def close(self) -> None:
        await self.redis.aclose()


class RateLimiterUnavailable(RuntimeError):
    """Redis is unreachable and the limiter is configured to fail closed."""
