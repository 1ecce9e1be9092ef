"""The message store and the outbox against a real MongoDB-wire server (FerretDB on SQLite)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import MongoServer
from waso.session_runtime.events import (
    Delivery,
    SessionEvent,
    message_acked,
    message_received,
    message_sent,
)
from waso.session_runtime.store import BadCursor, MessageStore, decode_cursor, encode_cursor
from waso.session_runtime.transport import AckStatus, IncomingMessage, MessageAck

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
StoreFactory = Callable[[str, int], MessageStore]


@pytest.fixture
async def stores(mongo_server: MongoServer) -> AsyncIterator[StoreFactory]:
    """Stores of several tenants and shards in one fresh database."""
    url = f"{mongo_server.url.rstrip('/')}/t{uuid.uuid4().hex[:12]}"
    made: list[MessageStore] = []

    def make(tenant: str, shard: int = 0) -> MessageStore:
        store = MessageStore(url, tenant, shard)
        made.append(store)
        return store

    yield make
    await made[0].client.drop_database(made[0].messages.database.name)
    for store in made:
        await store.close()


def inbound(n: int, chat: str = "15550001@s.whatsapp.net", at: datetime = T0) -> SessionEvent:
    return message_received("s1", IncomingMessage("+15550001", f"m{n}", f"3EB0{n:08d}", chat, at))


async def record_all(store: MessageStore, events: list[SessionEvent]) -> None:
    for start in range(0, len(events), 100):  # as the runtime's intake takes them: 100 at a time
        await store.record(events[start : start + 100])


async def test_messages_are_kept_once_and_acks_only_move_forward(stores: StoreFactory) -> None:
    store = stores("acme", 0)
    await store.setup()
    await store.record([inbound(1)])
    await store.record([inbound(1)])  # WhatsApp redelivers: still one message
    await store.record([message_sent("s1", "3EB0OUT", "+15550002", "hello", T0)])
    chat = "15550002@s.whatsapp.net"
    for status in (AckStatus.READ, AckStatus.DELIVERED):  # a late 'delivered' does not hide 'read'
        await store.record([message_acked("s1", MessageAck(("3EB0OUT",), chat, status, T0))])
    page = await store.page("s1")
    assert [(m["id"], m["direction"], m["status"]) for m in page.items] == [
        ("3EB000000001", "in", "received"),
        ("3EB0OUT", "out", "read"),
    ]
    assert page.items[1]["to"] == "+15550002"
    assert page.items[1]["chat"] == chat
    assert page.next is None


async def test_pages_cover_every_message_exactly_once_in_order(stores: StoreFactory) -> None:
    """(The read API pages through 10,000 in test_events.)"""
    store = stores("acme", 0)
    await store.setup()
    chats = ["1555000100@s.whatsapp.net", "1555000200@s.whatsapp.net"]
    # Many messages share a millisecond: the cursor must break ties by key, not skip or repeat them.
    events = [inbound(n, chats[n % 2], T0 + timedelta(milliseconds=n // 7)) for n in range(2_000)]
    await record_all(store, events)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.page("s1", cursor=cursor, limit=500)
        seen += [m["id"] for m in page.items]
        pages += 1
        if page.next is None:
            break
        cursor = page.next
    expected = [e.data["id"] for e in sorted(events, key=lambda e: (e.time, f"acme/s1/{e.data['id']}"))]
    assert seen == expected
    assert pages == 4
    window = await store.page(
        "s1", chat=chats[1], since=T0 + timedelta(milliseconds=100), until=T0 + timedelta(milliseconds=200), limit=500
    )
    wanted = [e.data["id"] for e in events if e.chat == chats[1] and 100 <= (e.time - T0).total_seconds() * 1000 < 200]
    assert sorted(m["id"] for m in window.items) == sorted(wanted)
    assert len(wanted) == 350
    assert {m["chat"] for m in window.items} == {chats[1]}


async def test_retention_and_the_size_cap_hold_per_tenant(stores: StoreFactory) -> None:
    acme, globex = stores("acme", 0), stores("globex", 0)
    await acme.setup()
    now = T0 + timedelta(days=40)
    old = [inbound(n, at=T0 + timedelta(minutes=n)) for n in range(50)]  # 40 days old
    fresh = [inbound(100 + n, at=now - timedelta(minutes=300 - n)) for n in range(300)]
    await record_all(acme, old + fresh)
    await record_all(globex, old + fresh)
    removed = await acme.prune(retention_days=30, max_messages=120, now=now)
    assert removed == 50 + 180
    kept = [m["id"] for m in (await acme.page("s1", limit=500)).items]
    assert kept == [e.data["id"] for e in fresh[-120:]]  # the newest 120
    assert len((await globex.page("s1", limit=500)).items) == 350  # another tenant's messages are untouched
    assert await acme.prune(retention_days=30, max_messages=120, now=now) == 0


async def test_the_outbox_keeps_order_per_lane_ignores_repeats_and_is_per_shard(stores: StoreFactory) -> None:
    shard0, shard1 = stores("acme", 0), stores("acme", 1)
    await shard0.setup()
    body = b'{"specversion":"1.0"}'
    lane0 = [Delivery("wh-a", 0, seq, f"e{seq}", body) for seq in (30, 10, 20)]
    assert await shard0.add(lane0) == 3
    assert await shard0.add([lane0[1], Delivery("wh-a", 1, 5, "e5", body)]) == 2  # e10 again: still one
    await shard0.add([Delivery("wh-b", 0, 1, "b1", body)])
    await shard1.add([Delivery("wh-a", 0, 1, "other-shard", body)])
    assert await shard0.backlog("wh-a") == 4
    order = []
    while (head := await shard0.head("wh-a", 0)) is not None:
        order.append(head.event_id)
        assert head.body == body
        await shard0.remove(head)
    assert order == ["e10", "e20", "e30"]
    await shard0.drop("wh-a")
    assert await shard0.backlog("wh-a") == 0
    assert await shard0.backlog("wh-b") == 1
    await shard0.add([Delivery("wh-c", 2, 40, "c1", body)])
    await shard0.retain({"wh-c"})  # wh-b was deleted while the runtime was away
    assert await shard0.backlog("wh-b") == 0
    assert await shard0.backlog("wh-c") == 1
    assert (await shard1.head("wh-a", 0)) == Delivery("wh-a", 0, 1, "other-shard", body)


def test_cursors_round_trip_and_foreign_ones_are_refused() -> None:
    at = datetime(2026, 11, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert decode_cursor(encode_cursor(at, "acme/s1/3EB0")) == (at, "acme/s1/3EB0")
    for bad in ("", "not base64!", "WzEsMl0", "eyJhIjoxfQ", "W10"):
        with pytest.raises(BadCursor):
            decode_cursor(bad)
