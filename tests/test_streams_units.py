"""QR stream slots (waso.session_runtime.streams): the pure rule, the in-memory count on a fake clock,
the shared count in a real redis-server, and the pod's and tenant's caps together. No cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import RedisServer
from tests.support import free_port, wait_for_async
from waso.session_runtime.config import RuntimeConfig
from waso.session_runtime.streams import (
    Admission,
    MemoryTenantStreams,
    RedisTenantStreams,
    Refused,
    SlotsUnavailable,
    StreamSlots,
    TenantStreams,
    admit,
    stream_slots,
)

Step = tuple[str, int, float]
"""(hold or release, stream number, seconds since the previous step)."""


@given(
    st.lists(
        st.tuples(st.sampled_from(["hold", "release"]), st.integers(0, 6), st.floats(0, 20)), min_size=1, max_size=60
    ),
    st.integers(0, 4),
)
@settings(max_examples=300, derandomize=True, database=None)
def test_admit_never_holds_more_than_the_cap_and_lets_a_lapsed_slot_go(steps: list[Step], cap: int) -> None:
    """Whatever the order of holds, refreshes, releases and lapses: at most ``cap`` live slots; a live slot
    is always refreshed; a slot unrefreshed for ``ttl`` no longer counts."""
    ttl, now = 30.0, 0.0
    entries: dict[str, float] = {}
    for action, number, elapsed in steps:
        now += elapsed
        member = f"stream-{number}"
        if action == "release":
            entries.pop(member, None)
            continue
        live_before = {m for m, expiry in entries.items() if expiry > now}
        entries, admission = admit(entries, member, now, cap, ttl)
        assert len(entries) <= cap
        assert set(entries) <= live_before | {member}  # lapsed slots are gone
        if member in live_before:
            assert admission.allowed  # a stream that holds its slot keeps it
        else:
            assert admission.allowed == (len(live_before) < cap)
        assert admission.open == len(entries if admission.allowed else live_before)


@pytest.fixture(params=["memory", "redis"])
async def counter(request: pytest.FixtureRequest) -> AsyncIterator[TenantStreams]:
    found: TenantStreams = (
        MemoryTenantStreams()
        if request.param == "memory"
        else RedisTenantStreams(request.getfixturevalue("redis_server").url)
    )
    try:
        yield found
    finally:
        await found.close()


def _tenant() -> str:
    return f"acme-{uuid.uuid4().hex[:6]}"


async def test_both_counts_hold_refresh_and_release_by_the_same_rules(counter: TenantStreams) -> None:
    tenant, other = _tenant(), _tenant()
    assert [(await counter.hold(tenant, m, 2)).allowed for m in ("a", "b", "c")] == [True, True, False]
    refused = await counter.hold(tenant, "c", 2)
    assert (refused.allowed, refused.open) == (False, 2)
    refreshed = await counter.hold(tenant, "a", 2)  # a refresh of a held slot, at the cap
    assert (refreshed.allowed, refreshed.open) == (True, 2)
    assert (await counter.hold(tenant, "a", 1)).allowed  # a lowered cap does not end an open stream
    assert (await counter.hold(other, "a", 2)).allowed  # tenants are counted apart
    await counter.release(tenant, "a")
    await counter.release(tenant, "a")  # twice is harmless
    admitted = await counter.hold(tenant, "c", 2)
    assert (admitted.allowed, admitted.open) == (True, 2)
    assert not (await counter.hold(tenant, "d", 0)).allowed  # maxPairingStreams 0: no stream at all


async def test_memory_slots_lapse_after_the_ttl_without_a_refresh() -> None:
    clock = {"now": 100.0}
    counter = MemoryTenantStreams(ttl=30.0, clock=lambda: clock["now"])
    assert (await counter.hold("acme", "crashed", 1)).allowed
    clock["now"] = 129.9
    assert not (await counter.hold("acme", "new", 1)).allowed
    clock["now"] = 130.0
    assert (await counter.hold("acme", "new", 1)).allowed
    assert counter.entries == {"acme": {"new": 160.0}}


async def test_a_crashed_pods_redis_slots_lapse_and_the_key_goes_with_them(redis_server: RedisServer) -> None:
    tenant = _tenant()
    crashed, survivor = RedisTenantStreams(redis_server.url, ttl=0.3), RedisTenantStreams(redis_server.url, ttl=0.3)
    try:
        assert (await crashed.hold(tenant, "pod-0/a", 1)).allowed
        await crashed.close()  # the pod is gone without releasing its slot
        assert not (await survivor.hold(tenant, "pod-1/b", 1)).allowed

        async def admitted() -> bool:
            return (await survivor.hold(tenant, "pod-1/b", 1)).allowed

        await wait_for_async(admitted, within=10, what="the crashed pod's slot to lapse")
        assert await survivor.redis.zrange(survivor.key(tenant), 0, -1) == [b"pod-1/b"]
        await survivor.release(tenant, "pod-1/b")

        async def key_gone() -> bool:
            return not await survivor.redis.exists(survivor.key(tenant))

        await survivor.hold(tenant, "pod-1/c", 1)
        await wait_for_async(key_gone, within=10, what="the tenant's key to expire with its last slot")
    finally:
        await survivor.close()


async def test_concurrent_pods_never_take_more_than_the_tenants_cap(redis_server: RedisServer) -> None:
    tenant = _tenant()
    pods = [RedisTenantStreams(redis_server.url) for _ in range(4)]
    try:
        answers = await asyncio.gather(
            *(pods[i % 4].hold(tenant, f"pod-{i % 4}/{i}", 5) for i in range(40))
        )  # fmt: skip
        assert sum(a.allowed for a in answers) == 5
        assert await pods[0].redis.zcard(pods[0].key(tenant)) == 5
    finally:
        for pod in pods:
            await pod.close()


def _config(**settings: object) -> RuntimeConfig:
    return RuntimeConfig.model_validate({"namespace": "acme", "pod_name": "waso-sessions-0", **settings})


async def test_the_pods_cap_is_checked_first_and_a_released_slot_is_free_again() -> None:
    slots = stream_slots(_config(max_qr_streams=2))
    first = await slots.acquire("acme", 5)
    second = await slots.acquire("acme", 5)
    with pytest.raises(Refused) as refused:
        await slots.acquire("acme", 5)
    assert (refused.value.cap, refused.value.open, refused.value.limit) == ("pod", 2, 2)
    await slots.release(first)
    third = await slots.acquire("acme", 5)
    await slots.release(second)
    with pytest.raises(Refused) as by_tenant:
        await slots.acquire("acme", 1)  # the tenant's cap, below the pod's
    assert (by_tenant.value.cap, by_tenant.value.open, by_tenant.value.limit) == ("tenant", 1, 1)
    assert slots.local == 1
    await slots.release(third)
    assert slots.local == 0
    await slots.close()


async def test_two_pods_of_a_tenant_share_its_cap_through_redis(redis_server: RedisServer) -> None:
    tenant = _tenant()
    shard0 = stream_slots(_config(namespace=tenant, redis_url=redis_server.url, pod_name="waso-sessions-0"))
    shard1 = stream_slots(_config(namespace=tenant, redis_url=redis_server.url, pod_name="waso-sessions-1"))
    try:
        held = await shard0.acquire(tenant, 2)
        await shard1.acquire(tenant, 2)
        with pytest.raises(Refused) as refused:
            await shard1.acquire(tenant, 2)
        assert (refused.value.cap, refused.value.open) == ("tenant", 2)
        assert shard1.local == 1  # a refused stream holds nothing on its pod
        assert await shard0.refresh(held, 2)
        await shard0.release(held)
        assert (await shard1.acquire(tenant, 2)).counted
    finally:
        await shard0.close()
        await shard1.close()


async def test_without_redis_failing_open_counts_the_pod_and_failing_closed_refuses() -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    open_slots = stream_slots(_config(redis_url=unreachable, rate_limit_fail="open"))
    taken = await open_slots.acquire("acme", 1)
    assert not taken.counted
    assert await open_slots.refresh(taken, 1)
    with pytest.raises(Refused) as refused:
        await open_slots.acquire("acme", 1)  # the tenant's cap, counted on this pod alone
    assert refused.value.cap == "tenant"
    await open_slots.release(taken)
    assert open_slots.local == 0
    await open_slots.close()

    closed_slots = stream_slots(_config(redis_url=unreachable, rate_limit_fail="closed"))
    with pytest.raises(SlotsUnavailable):
        await closed_slots.acquire("acme", 1)
    assert closed_slots.local == 0
    await closed_slots.close()


async def test_a_request_cancelled_while_asking_redis_holds_no_pod_slot() -> None:
    asked = asyncio.Event()

    class Stuck(MemoryTenantStreams):
        async def hold(self, tenant: str, member: str, cap: int) -> Admission:
            asked.set()
            await asyncio.Event().wait()  # Redis never answers
            raise AssertionError("unreachable")

    slots = StreamSlots(1, Stuck(), fail_open=True, identity="pod-0/x")
    waiting = asyncio.create_task(slots.acquire("acme", 1))
    await asyncio.wait_for(asked.wait(), 5)
    assert slots.local == 1  # taken before the await: a concurrent request meets the pod's cap
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.local == 0
