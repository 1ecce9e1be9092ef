"""Pure parts of the runtime: lease rules, rate-limit bucket, back-off; placement invariants. No cluster."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_decisions import facts
from waso.leases import LeaseAction, LeaseView, lease_action, still_held
from waso.operator.placement import assign_shards, replicas_needed
from waso.session_runtime.backoff import Backoff
from waso.session_runtime.ratelimit import MemoryRateLimiter, take

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_lease_rules() -> None:
    mine = LeaseView("pod-0/a", T0, 15)
    theirs = LeaseView("pod-0/b", T0, 15)
    assert lease_action(None, "pod-0/a", T0) == LeaseAction.CREATE
    assert lease_action(mine, "pod-0/a", T0 + timedelta(seconds=5)) == LeaseAction.RENEW
    assert lease_action(theirs, "pod-0/a", T0 + timedelta(seconds=14)) == LeaseAction.WAIT
    assert lease_action(theirs, "pod-0/a", T0 + timedelta(seconds=15)) == LeaseAction.TAKE
    assert lease_action(LeaseView(None, None, 15), "pod-0/a", T0) == LeaseAction.TAKE  # released


def test_a_holder_lets_go_before_a_challenger_may_take_over() -> None:
    for duration in (3, 15, 60):
        last = T0
        give_up = next(
            s for s in range(duration * 10) if not still_held(last, duration, T0 + timedelta(seconds=s / 10))
        )
        takeover = duration * 10  # a challenger's first chance, in tenths of a second
        assert give_up < takeover
        assert still_held(last, duration, T0 + timedelta(seconds=duration / 3))  # survives one missed renewal


def test_token_bucket_allows_a_minute_at_once_then_the_steady_rate() -> None:
    clock = {"now": 0.0}
    limiter = MemoryRateLimiter(clock=lambda: clock["now"])

    async def burst(n: int) -> list[bool]:
        return [(await limiter.acquire("acme", 60)).allowed for _ in range(n)]

    import asyncio

    assert asyncio.run(burst(61)) == [True] * 60 + [False]
    refused = asyncio.run(limiter.acquire("acme", 60))
    assert 0.9 < refused.retry_after <= 1.0  # one token per second at 60/min
    clock["now"] = 1.0
    assert asyncio.run(limiter.acquire("acme", 60)).allowed
    assert asyncio.run(limiter.acquire("globex", 60)).allowed  # buckets are per tenant


@given(st.lists(st.floats(min_value=0, max_value=30), min_size=1, max_size=200), st.integers(1, 600))
def test_a_bucket_never_grants_more_than_its_capacity_plus_refill(gaps: list[float], per_minute: int) -> None:
    bucket, now, granted = None, 0.0, 0
    for gap in gaps:
        now += gap
        bucket, decision = take(bucket, per_minute, now)
        granted += decision.allowed
    assert granted <= per_minute + now * per_minute / 60 + 1e-6


def test_backoff_grows_with_jitter_to_a_cap_and_resets() -> None:
    backoff = Backoff(base=1, cap=60, rng=random.Random(7))
    delays = [backoff.next() for _ in range(10)]
    for attempt, delay in enumerate(delays):
        ceiling = min(60, 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.one_of(st.none(), st.integers(0, 4))), max_size=40),
    st.integers(1, 6),
)
def test_placement_keeps_shards_and_fills_new_sessions_within_room(
    rows: list[tuple[bool, int | None]], per_pod: int
) -> None:
    sessions = [facts(f"s{i}", age=i, shard=held) for i, (_, held) in enumerate(rows)]
    running = {f"s{i}": run for i, (run, _) in enumerate(rows)}
    shards = assign_shards(sessions, running, per_pod)
    for session in sessions:
        if session.shard is not None:
            assert shards[session.uid] == session.shard  # never moves
        elif not running[session.uid]:
            assert session.uid not in shards  # parked without a shard gets none
    load = Counter(shards.values())
    newcomers = [s for s in sessions if s.shard is None and s.uid in shards]
    for session in newcomers:  # a new assignment never overfills a shard
        held_there = sum(1 for s in sessions if s.shard == shards[session.uid])
        assert load[shards[session.uid]] <= max(per_pod, held_there)
    needed = replicas_needed(shards, running)
    assert all(shards[uid] < needed for uid, run in running.items() if run and uid in shards)


def test_a_standby_retries_just_after_the_holders_lease_runs_out() -> None:
    from waso.lease_keeper import LeaseKeeper

    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    keeper = LeaseKeeper(None, "acme", "pod-b/2", 15, lambda: now, "waso-runtime")  # type: ignore[arg-type]
    assert keeper.retry_after("waso-session-s1") == 5.0  # nothing read yet: a third of the duration
    keeper.expiries["waso-session-s1"] = now + timedelta(seconds=2)
    assert keeper.retry_after("waso-session-s1") == 2.1
    keeper.expiries["waso-session-s1"] = now - timedelta(seconds=1)
    assert keeper.retry_after("waso-session-s1") == 0.2


def test_a_failed_status_write_is_made_again_while_the_lease_is_held() -> None:
    import asyncio

    from waso.api.session import RuntimeState, RuntimeStatus
    from waso.session_runtime.supervisor import SessionSupervisor
    from waso.session_runtime.transport import Connected, SessionIdentity, Transport

    class Live(Transport):
        def stored_jid(self) -> str | None:
            return "4915112345601:11@s.whatsapp.net"

        async def start(self) -> None:
            self.events.put_nowait(Connected("4915112345601:11@s.whatsapp.net", None))

        async def stop(self) -> None: ...

        async def send_text(self, to: str, text: str) -> str:
            return "id"

        async def request_pair_code(self) -> str:
            return "code"

        async def unlink(self) -> None: ...

    class Held:
        duration = 3

        async def hold(self, name: str) -> datetime:
            return datetime.now(UTC)

        async def release(self, name: str) -> None: ...

        def retry_after(self, name: str) -> float:
            return 1.0

    stored: list[RuntimeState | None] = []
    attempts: list[RuntimeState | None] = []
    connected = asyncio.Event()

    async def flaky(name: str, status: RuntimeStatus) -> None:
        attempts.append(status.state)
        if status.state == RuntimeState.CONNECTED and RuntimeState.CONNECTED not in attempts[:-1]:
            return  # the first write of Connected is lost
        if not stored or stored[-1] != status.state:
            stored.append(status.state)
        if status.state == RuntimeState.CONNECTED:
            connected.set()

    async def scenario() -> None:
        identity = SessionIdentity("acme", "s1", "+4915112345601", "waso", Path("/nonexistent"))
        supervisor = SessionSupervisor(identity, Live, Held(), flaky)
        supervisor.start()
        supervisor.want(True)
        async with asyncio.timeout(30):
            await connected.wait()  # put right at the next renewal (every second)
        await supervisor.close()

    asyncio.run(scenario())
    assert stored[-1] == RuntimeState.STOPPED
    assert RuntimeState.CONNECTED in stored


def test_the_memory_reported_is_the_working_set_as_kubelet_counts_it(tmp_path: Path) -> None:
    from waso.session_runtime.runtime import read_memory

    assert read_memory(tmp_path) is None  # no memory controller here (not in a container)
    (tmp_path / "memory.current").write_text("1000000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert read_memory(tmp_path) == (1000000, 0)  # no limit
    (tmp_path / "memory.max").write_text("4000000\n")
    (tmp_path / "memory.stat").write_text("anon 600000\nfile 400000\nactive_file 100000\ninactive_file 300000\n")
    assert read_memory(tmp_path) == (700000, 4000000)  # the inactive file cache is reclaimed before an OOM kill


def test_the_memory_of_a_cgroup_v1_container_is_read_from_its_memory_hierarchy(tmp_path: Path) -> None:
    from waso.session_runtime.runtime import read_memory

    v1 = tmp_path / "memory"  # /sys/fs/cgroup/memory in a container on a cgroup v1 node
    v1.mkdir()
    (v1 / "memory.usage_in_bytes").write_text("5000000\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert read_memory(tmp_path) == (5000000, 0)  # v1's "no limit"
    (v1 / "memory.limit_in_bytes").write_text("536870912\n")
    (v1 / "memory.stat").write_text("cache 2000000\ninactive_file 10\ntotal_inactive_file 1500000\n")
    assert read_memory(tmp_path) == (3500000, 536870912)  # kubelet subtracts total_inactive_file on v1
