"""The EventHub delivering to real HTTP endpoints in this process: order, signatures, retries, isolation."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from tests.receiver import SIGNING_KEY, Receiver, running_receiver
from tests.support import wait_for_async
from waso.api.base import ObjectMeta
from waso.api.webhook import EventType, LabelSelector, SecretKeyReference, Webhook, WebhookSpec
from waso.session_runtime.backoff import Backoff
from waso.session_runtime.events import (
    LANES,
    Delivery,
    EventHub,
    MemoryOutbox,
    SessionEvent,
    cloud_event,
    lane_of,
    message_received,
    signing_key,
)
from waso.session_runtime.transport import IncomingMessage

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def webhook(name: str, url: str, *types: EventType, selector: LabelSelector | None = None) -> Webhook:
    spec = WebhookSpec(
        url=url,
        secret_ref=SecretKeyReference(name="hook-key"),
        session_selector=selector or LabelSelector(),
        event_types=types or (EventType.MESSAGE_RECEIVED,),
    )
    return Webhook(metadata=ObjectMeta(name=name, namespace="acme", uid=f"uid-{name}"), spec=spec)


def received(n: int, chat: str, session: str = "s1") -> SessionEvent:
    return message_received(session, IncomingMessage("+1555", f"m{n}", f"3EB0{n:06d}", chat, T0 + timedelta(seconds=n)))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as found:
        yield found


@pytest.fixture
async def hub() -> AsyncIterator[EventHub]:
    async def read_secret(name: str, key: str) -> bytes:
        assert (name, key) == ("hook-key", "signingKey")
        return SIGNING_KEY

    labels = {"s1": {"team": "support"}, "s2": {"team": "sales"}}
    found = EventHub(
        "acme",
        0,
        MemoryOutbox(1000),
        read_secret,
        lambda session: labels.get(session, {}),
        backoff=lambda: Backoff(base=0.01, cap=0.05),
    )
    found.subscribed.set()  # as after the runtime's first listing of Webhooks
    async with aiohttp.ClientSession() as http:
        found.start(http)
        yield found
        await found.stop()


def test_a_cloud_event_carries_a_stable_id_its_chat_and_the_message() -> None:
    event = received(7, "15550001@s.whatsapp.net")
    body = cloud_event("acme", event)
    parsed = from_http_event(HTTPMessage({"content-type": "application/cloudevents+json"}, body))
    assert parsed.get_id() == "acme/s1/MessageReceived/3EB0000007" == event.id("acme")
    assert parsed.get_type() == "dev.waso.message.received"
    assert parsed.get_source() == "/apis/waso.dev/v1alpha1/namespaces/acme/whatsappsessions/s1"
    assert parsed.get_subject() == "15550001@s.whatsapp.net"
    assert parsed.get_extension("partitionkey") == "s1/15550001@s.whatsapp.net"
    assert parsed.get_data() == {
        "session": "s1",
        "id": "3EB0000007",
        "from": "+1555",
        "chat": "15550001@s.whatsapp.net",
        "text": "m7",
    }
    assert body == cloud_event("acme", received(7, "15550001@s.whatsapp.net"))  # the same bytes on every attempt


def test_signing_keys_are_raw_or_standard_webhooks_and_never_short() -> None:
    assert signing_key(SIGNING_KEY) == SIGNING_KEY
    assert signing_key(b"whsec_" + base64.b64encode(SIGNING_KEY)) == SIGNING_KEY
    with pytest.raises(ValueError, match="at least 24"):
        signing_key(b"short")


async def test_every_event_arrives_once_signed_and_in_order_per_chat(hub: EventHub, receiver: Receiver) -> None:
    await hub.update(webhook("app", receiver.url))
    chats = [f"1555000{c}@s.whatsapp.net" for c in range(6)]
    events = [received(n, chats[n % 6]) for n in range(120)]
    receiver.failing = 15  # a sick endpoint: every lane retries, none reorders
    for event in events:
        hub.emit(event)
    await wait_for_async(lambda: len(receiver.events) == 120, within=20, what="all 120 events delivered")
    assert receiver.bad_signatures == 0
    for chat in chats:
        got = [e.data["id"] for e in receiver.events if e.partition == f"s1/{chat}"]
        assert got == [e.data["id"] for e in events if e.chat == chat]
    stats = next(s for _, s in await hub.report())
    assert stats.delivered == 120
    assert stats.failures == 15
    assert stats.backlog == 0
    assert stats.consecutive_failures == 0


async def test_a_dead_endpoint_holds_back_nothing_of_another(hub: EventHub, receiver: Receiver) -> None:
    with running_receiver() as dead:
        dead.down()
        await hub.update(webhook("dead", dead.url))
        await hub.update(webhook("live", receiver.url))
        for n in range(40):
            hub.emit(received(n, f"1555{n % 4}@s.whatsapp.net"))
        await wait_for_async(lambda: len(receiver.events) == 40, within=20, what="the live endpoint got everything")
        reports = {w.metadata.name: s for w, s in await hub.report()}
        assert reports["dead"].backlog == 40
        assert reports["dead"].consecutive_failures > 0
        assert "ClientConnectorError" in (reports["dead"].last_error or "")
        dead.up()
        await wait_for_async(lambda: len(dead.events) == 40, within=20, what="the revived endpoint got the backlog")
        assert [e.id for e in dead.events if e.partition.endswith("15550@s.whatsapp.net")] == [
            e.id for e in receiver.events if e.partition.endswith("15550@s.whatsapp.net")
        ]


async def test_only_selected_sessions_and_types_are_sent(hub: EventHub, receiver: Receiver) -> None:
    selector = LabelSelector(match_labels={"team": "support"})
    await hub.update(webhook("support", receiver.url, EventType.MESSAGE_RECEIVED, selector=selector))
    hub.emit(received(1, "a@s.whatsapp.net", session="s2"))  # sales: not selected
    hub.emit(SessionEvent(EventType.SESSION_STATUS, "s1", "Connected/1", T0, {"state": "Connected"}))  # not a type
    hub.emit(received(2, "a@s.whatsapp.net", session="s1"))
    await wait_for_async(lambda: len(receiver.events) == 1, within=20, what="the one selected event")
    assert hub.intake.empty()
    assert receiver.events[0].data["id"] == "3EB0000002"


async def test_a_deleted_webhook_forgets_its_backlog(hub: EventHub) -> None:
    await hub.update(webhook("gone", "http://127.0.0.1:9/nothing"))
    for n in range(5):
        hub.emit(received(n, "a@s.whatsapp.net"))
    await wait_for_async(lambda: hub.intake.empty(), within=20, what="events accepted")
    assert isinstance(hub.outbox, MemoryOutbox)
    assert await hub.outbox.backlog("uid-gone") == 5
    await hub.remove("uid-gone")
    assert hub.outbox.size == 0
    assert hub.endpoints == {}


async def test_an_unreadable_key_is_reported_and_nothing_is_sent_unsigned(receiver: Receiver) -> None:
    async def forbidden(name: str, key: str) -> bytes:
        raise PermissionError("403 secrets hook-key is forbidden")

    hub = EventHub("acme", 0, MemoryOutbox(10), forbidden, lambda session: {})
    hub.subscribed.set()
    async with aiohttp.ClientSession() as http:
        hub.start(http)
        await hub.update(webhook("app", receiver.url))
        hub.emit(received(1, "a@s.whatsapp.net"))
        await wait_for_async(lambda: hub.intake.empty(), within=20, what="event accepted")
        (_, stats), *_ = await hub.report()
        assert stats.backlog == 1
        assert "signing key hook-key/signingKey not usable: 403" in (stats.last_error or "")
        assert receiver.attempts == 0
        await hub.stop()


def test_lanes_spread_chats_and_keep_one_chat_in_one_lane() -> None:
    lanes = {lane_of(f"s1/{n}@s.whatsapp.net") for n in range(100)}
    assert lanes == set(range(LANES))
    assert len({lane_of("s1/x@s.whatsapp.net") for _ in range(10)}) == 1


def test_a_full_intake_drops_instead_of_waiting() -> None:
    async def never(name: str, key: str) -> bytes:
        raise AssertionError

    async def scenario() -> int:
        hub = EventHub("acme", 0, MemoryOutbox(10), never, lambda s: {}, intake_capacity=3)
        for n in range(5):
            hub.emit(received(n, "a@s.whatsapp.net"))  # returns at once even though nobody takes them
        return hub.intake.qsize()

    assert asyncio.run(scenario()) == 3


def test_a_full_webhook_share_of_the_memory_outbox_refuses_only_that_webhook() -> None:
    async def scenario() -> tuple[int, int, int, int]:
        outbox = MemoryOutbox(3)
        body = b"{}"
        dead = [Delivery("dead", 0, n, f"e{n}", body) for n in range(5)]
        kept_dead = await outbox.add(dead)
        kept_live = await outbox.add([Delivery("live", 1, 9, "e9", body)])
        await outbox.retain({"live"})  # "dead" was deleted while nobody watched
        return kept_dead, kept_live, await outbox.backlog("dead"), await outbox.backlog("live")

    assert asyncio.run(scenario()) == (3, 1, 0, 1)
