"""QR stream slots: how many pairing streams may be open at once, on this pod and for the tenant.

Two caps, checked in this order when a stream opens:

- the pod's (``WASO_MAX_QR_STREAMS``), always counted here, in this process;
- the tenant's (TenantQuota ``maxPairingStreams``), over all the tenant's shards. One shard
  counts in memory. Shards that share a Redis (``WASO_REDIS_URL``) count in one sorted set per
  tenant, ``waso:qrstreams:<tenant>``: a member per open stream, scored by the time (Redis
  server time, in ms) at which it lapses. An open stream refreshes its member every
  ``ttl / 3`` seconds; a closed stream removes it; a pod that crashes leaves members that lapse
  after ``ttl``. One Lua script drops lapsed members, counts and adds, so concurrent pods cannot
  both take the last slot. The in-memory count follows the same rules (``admit``), so the two
  can be tested side by side.

When Redis cannot be reached, ``WASO_RATE_LIMIT_FAIL`` decides as it does for messages: open
falls back to this pod's own count against the tenant's cap (each shard then allows the cap,
as before shared counting), closed refuses the stream (503). A failed refresh or release is
logged: the member lapses after ``ttl`` at the latest. A stream whose member has lapsed (its
pod could not refresh for ``ttl``) takes a slot again at its next refresh, if one is free;
otherwise it must end.

Nothing here knows HTTP: the handler turns a refusal into 429 and unavailability into 503.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from waso.session_runtime import metrics
from waso.session_runtime.config import RuntimeConfig

log = logging.getLogger("waso.runtime")

SLOT_TTL_SECONDS = 30.0
"""How long a tenant slot outlives its last refresh (a crashed pod's streams count this long at most)."""


@dataclass(frozen=True)
class Admission:
    allowed: bool
    open: int
    """Streams of the tenant open after the decision (allowed), or found open (refused)."""


def admit(
    entries: Mapping[str, float], member: str, now: float, cap: int, ttl: float
) -> tuple[dict[str, float], Admission]:
    """Drop lapsed entries, then hold ``member`` until ``now + ttl`` if it holds a slot already or one is free.

    ``entries`` maps a stream to the time its slot lapses; the pure core of both tenant counters.
    """
    live = {name: expiry for name, expiry in entries.items() if expiry > now}
    if member not in live and len(live) >= cap:
        return live, Admission(False, len(live))
    live[member] = now + ttl
    return live, Admission(True, len(live))


class TenantStreams(Protocol):
    """Counts a tenant's open streams; ``hold`` both takes a slot and refreshes one already held."""

    ttl: float

    async def hold(self, tenant: str, member: str, cap: int) -> Admission: ...

    async def release(self, tenant: str, member: str) -> None: ...

    async def close(self) -> None: ...


class MemoryTenantStreams:
    def __init__(self, ttl: float = SLOT_TTL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.entries: dict[str, dict[str, float]] = {}

    async def hold(self, tenant: str, member: str, cap: int) -> Admission:
        live, admission = admit(self.entries.get(tenant, {}), member, self.clock(), cap, self.ttl)
        self.entries[tenant] = live
        return admission

    async def release(self, tenant: str, member: str) -> None:
        held = self.entries.get(tenant)
        if held is not None:
            held.pop(member, None)
            if not held:
                del self.entries[tenant]

    async def close(self) -> None:
        pass


# KEYS[1]: the tenant's sorted set; ARGV: member, cap, ttl in ms. The same rules as ``admit``, with
# the Redis server's clock, so pods with skewed clocks agree. Returns {allowed, open}.
_HOLD = """
local cap = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local open = redis.call('ZCARD', KEYS[1])
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not held and open >= cap then
  return {0, open}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if held then
  return {1, open}
end
return {1, open + 1}
"""


class RedisTenantStreams:
    """The tenant's slots shared by its shards; raises ``SlotsUnavailable`` when Redis does not answer."""

    def __init__(self, url: str, ttl: float = SLOT_TTL_SECONDS) -> None:
        import redis.asyncio as aioredis

        self.ttl = ttl
        self.redis: Any = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.script = self.redis.register_script(_HOLD)

    @staticmethod
    def key(tenant: str) -> str:
        return f"waso:qrstreams:{tenant}"

    async def hold(self, tenant: str, member: str, cap: int) -> Admission:
        import redis

        try:
            allowed, found = await self.script(keys=[self.key(tenant)], args=[member, cap, int(self.ttl * 1000)])
        except (redis.RedisError, OSError) as error:
            metrics.REDIS_ERRORS.labels(tenant, "qrstreams").inc()
            raise SlotsUnavailable(str(error)) from error
        return Admission(bool(allowed), int(found))

    async def release(self, tenant: str, member: str) -> None:
        import redis

        try:
            await self.redis.zrem(self.key(tenant), member)
        except (redis.RedisError, OSError) as error:
            metrics.REDIS_ERRORS.labels(tenant, "qrstreams").inc()
            raise SlotsUnavailable(str(error)) from error

    async def close(self) -> None:
        await self.redis.aclose()


class SlotsUnavailable(RuntimeError):
    """The shared count cannot be reached."""


class Refused(Exception):
    def __init__(self, cap: Literal["pod", "tenant"], found: int, limit: int) -> None:
        super().__init__(f"{cap} cap: {found} of {limit} QR streams open")
        self.cap = cap
        self.open = found
        self.limit = limit


@dataclass(frozen=True)
class Slot:
    tenant: str
    member: str
    counted: bool
    """Held in the tenant's count; False when taken while Redis was unreachable (failing open)."""


class StreamSlots:
    """The pod's count and the tenant's; ``acquire`` raises ``Refused`` or ``SlotsUnavailable``."""

    def __init__(self, pod_cap: int, tenant: TenantStreams, *, fail_open: bool, identity: str) -> None:
        self.pod_cap = pod_cap
        self.tenant = tenant
        self.fail_open = fail_open
        self.identity = identity
        self.local = 0
        """Streams open on this pod (they are all the tenant's: a runtime serves one namespace)."""
        self.refresh_seconds = tenant.ttl / 3

    async def acquire(self, tenant: str, cap: int) -> Slot:
        if self.local >= self.pod_cap:
            raise Refused("pod", self.local, self.pod_cap)
        self.local += 1  # taken before any await, so two requests cannot both pass the pod's cap
        member = f"{self.identity}/{secrets.token_hex(6)}"
        try:
            admission = await self.tenant.hold(tenant, member, cap)
        except SlotsUnavailable as error:
            if not self.fail_open:
                self.local -= 1
                raise
            log.warning("stream slots unavailable (%s): counting this pod's streams only", error)
            if self.local > cap:
                self.local -= 1
                raise Refused("tenant", self.local, cap) from None
            return Slot(tenant, member, counted=False)
        except BaseException:
            self.local -= 1
            raise
        if not admission.allowed:
            self.local -= 1
            raise Refused("tenant", admission.open, cap)
        return Slot(tenant, member, counted=True)

    async def refresh(self, slot: Slot, cap: int) -> bool:
        """Keep the slot from lapsing; False when it had lapsed and the tenant's slots are now all taken."""
        if not slot.counted:
            return True
        try:
            return (await self.tenant.hold(slot.tenant, slot.member, cap)).allowed
        except SlotsUnavailable as error:
            log.warning("stream slot not refreshed (%s); it lapses in %.0f s", error, self.refresh_seconds * 3)
            return True

    async def release(self, slot: Slot) -> None:
        self.local -= 1
        if not slot.counted:
            return
        try:
            await self.tenant.release(slot.tenant, slot.member)
        except SlotsUnavailable as error:
            log.warning("stream slot not released (%s); it lapses in %.0f s", error, self.refresh_seconds * 3)

    async def close(self) -> None:
        await self.tenant.close()


def stream_slots(config: RuntimeConfig, ttl: float = SLOT_TTL_SECONDS) -> StreamSlots:
    """Shared through Redis when the tenant's shards have one, else counted in this process."""
    tenant: TenantStreams = RedisTenantStreams(config.redis_url, ttl) if config.redis_url else MemoryTenantStreams(ttl)
    return StreamSlots(
        config.max_qr_streams, tenant, fail_open=config.rate_limit_fail == "open", identity=config.identity
    )
