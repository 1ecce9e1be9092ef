"""Events out, end to end: simulator → runtime process → Webhook endpoint, with the real API server.

The Webhook and its signing Secret are real objects; the runtime reads them, delivers signed
CloudEvents to a receiver that checks signatures and drops repeats, and reports each endpoint's
deliveries in the Webhook's status. With the message store (FerretDB), a backlog outlives a
dead endpoint and a killed runtime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests import test_runtime
from tests.conftest import ControlPlane, MongoServer
from tests.operator_support import Tenants, api_token, get
from tests.receiver import SIGNING_KEY, Receiver, running_receiver
from tests.runtime_support import Process, http_json
from tests.support import wait_for
from tests.test_runtime import PHONE, World
from waso.session_runtime.events import SessionEvent, message_received
from waso.session_runtime.store import MessageStore
from waso.session_runtime.transport import IncomingMessage

simulator = test_runtime.simulator
operator = test_runtime.operator
world = test_runtime.world

SENDERS = ("+15550001", "+15550002", "+15550003")
GLOBEX_PHONE = "+4915112345699"
FAST_STATUS = {"WASO_EVENT_STATUS_SECONDS": "1"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as found:
        yield found


def create_webhook(world: World, name: str, url: str, types: list[str], **spec: Any) -> None:
    core = client.CoreV1Api(world.api)
    try:
        core.create_namespaced_secret(
            world.namespace,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="hook-key"), string_data={"signingKey": SIGNING_KEY.decode()}
            ),
        )
    except client.ApiException as error:
        if error.status != 409:
            raise
    body = {
        "apiVersion": "waso.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"name": name},
        "spec": {"url": url, "secretRef": {"name": "hook-key"}, "eventTypes": types, **spec},
    }
    client.CustomObjectsApi(world.api).create_namespaced_custom_object(
        "waso.dev", "v1alpha1", world.namespace, "webhooks", body
    )


def deliveries(world: World, name: str) -> dict[str, Any]:
    """Shard 0's entry in the Webhook's status (empty until written)."""
    obj = get(world.api, world.namespace, name, plural="webhooks")
    entries = {e["shard"]: e for e in obj.get("status", {}).get("deliveries", [])}
    entry: dict[str, Any] = entries.get(0, {})
    return entry


def inbound(world: World, n: int, phone: str = PHONE) -> str:
    """Message n from one of three people to ``phone``; returns its text."""
    text = f"m{n}"
    sent = http_json("POST", f"{world.simulator.url}/v1/phones/{phone}/inbound", {"from": SENDERS[n % 3], "text": text})
    assert sent.status == 200, sent.body
    assert sent.body["delivered"] == 1
    return text


def connected_runtime(world: World, env: dict[str, str] | None = None, phone: str = PHONE) -> Process:
    runtime = world.runtime(0, "data", **FAST_STATUS, **(env or {}))
    world.session(phone=phone)
    world.wait_state("AwaitingPairing")
    world.pair_by_qr(runtime, phone=phone)
    world.wait_state("Connected")
    return runtime


def assert_in_order_per_chat(receiver: Receiver, texts: list[str]) -> None:
    for index, sender in enumerate(SENDERS):
        chat = f"{sender.removeprefix('+')}@s.whatsapp.net"
        got = [e.data["text"] for e in receiver.of_type("message.received") if e.data["chat"] == chat]
        assert got == [t for n, t in enumerate(texts) if n % 3 == index]


def test_inbound_messages_reach_the_webhook_signed_once_and_in_order_per_chat(world: World, receiver: Receiver) -> None:
    types = ["MessageReceived", "MessageSent", "MessageAck", "SessionStatus", "Paired"]
    create_webhook(world, "app", receiver.url, types)
    runtime = connected_runtime(world)
    texts = [inbound(world, n) for n in range(60)]
    wait_for(lambda: len(receiver.of_type("message.received")) == 60, timeout=60, what="60 messages delivered")
    assert_in_order_per_chat(receiver, texts)
    assert receiver.bad_signatures == 0
    assert receiver.of_type("session.paired")[0].data["jid"] == world.runtime_status()["jid"]
    states = [e.data["state"] for e in receiver.of_type("session.status")]
    assert states[-1] == "Connected"
    assert "AwaitingPairing" in states

    sent = http_json("POST", f"{runtime.url}/v1/sessions/s1/messages", {"to": "+4915199999999", "text": "hi"},
                     token=world.token)  # fmt: skip
    assert sent.status == 202, sent.body
    message_id = sent.body["id"]
    wait_for(lambda: receiver.of_type("message.ack"), timeout=30, what="the receipt of the sent message")
    (out,) = receiver.of_type("message.sent")
    assert out.data == {"session": "s1", "id": message_id, "to": "+4915199999999",
                        "chat": "4915199999999@s.whatsapp.net", "text": "hi"}  # fmt: skip
    (ack,) = receiver.of_type("message.ack")
    assert ack.data["ids"] == [message_id]
    assert ack.data["status"] == "delivered"
    total = len(receiver.events)
    status = wait_for(
        lambda: (d := deliveries(world, "app")).get("delivered") == total and d, timeout=30, what="status"
    )
    assert status["backlog"] == 0
    assert status["consecutiveFailures"] == 0
    assert "lastSuccessAt" in status


def test_a_backlog_outlives_a_dead_endpoint_and_a_killed_runtime(
    world: World, receiver: Receiver, mongo_server: MongoServer
) -> None:
    store = {"WASO_MONGO_URL": f"{mongo_server.url.rstrip('/')}/{world.namespace}"}
    create_webhook(world, "app", receiver.url, ["MessageReceived"])
    runtime = connected_runtime(world, store)
    receiver.down()
    went_down = time.monotonic()
    texts = [inbound(world, n) for n in range(20)]
    backlog = wait_for(lambda: (d := deliveries(world, "app")).get("backlog") == 20 and d, timeout=60, what="backlog")
    assert backlog["consecutiveFailures"] > 0
    assert "posting to" in backlog["lastError"]

    before = world.runtime_status()["connectedAt"]
    runtime.stop(kill=True)  # SIGKILL with 20 events accepted and none delivered
    world.runtime(0, "data", **FAST_STATUS, **store)
    wait_for(lambda: (r := world.runtime_status()).get("state") == "Connected" and r.get("connectedAt") != before,
             timeout=60, what="s1 connected by the new runtime")  # fmt: skip
    texts += [inbound(world, n) for n in range(20, 30)]
    # The endpoint stays down a full minute, as the acceptance asks; the backlog holds meanwhile.
    wait_for(lambda: time.monotonic() - went_down >= 60 and deliveries(world, "app").get("backlog") == 30,
             timeout=120, what="a minute down, with all 30 in the backlog")  # fmt: skip
    receiver.up()
    wait_for(lambda: len(receiver.events) == 30, timeout=90, what="the backlog delivered after the endpoint is up")
    assert_in_order_per_chat(receiver, texts)
    assert receiver.bad_signatures == 0
    wait_for(lambda: deliveries(world, "app").get("backlog") == 0, timeout=30, what="backlog empty in status")


def test_a_dead_endpoint_does_not_hold_back_another(world: World, receiver: Receiver) -> None:
    with running_receiver() as dead:
        dead.down()
        create_webhook(world, "dead", dead.url, ["MessageReceived"])
        create_webhook(world, "live", receiver.url, ["MessageReceived"])
        connected_runtime(world)
        texts = [inbound(world, n) for n in range(30)]
        wait_for(lambda: len(receiver.events) == 30, timeout=60, what="the live endpoint's 30 events")
        assert_in_order_per_chat(receiver, texts)
        held = wait_for(lambda: (d := deliveries(world, "dead")).get("backlog") == 30 and d, timeout=30, what="dead")
        assert held["delivered"] == 0
        assert dead.attempts == 0


def test_the_read_api_pages_through_ten_thousand_messages(world: World, mongo_server: MongoServer) -> None:
    """Messages the runtime kept (one inbound through the whole path) and 10,000 more written to the same store."""
    url = f"{mongo_server.url.rstrip('/')}/{world.namespace}"
    runtime = connected_runtime(world, {"WASO_MONGO_URL": url})
    first = inbound(world, 0)
    messages = f"{runtime.url}/v1/sessions/s1/messages"
    kept = wait_for(lambda: (r := http_json("GET", messages, token=world.token)).body.get("items") and r, timeout=30,
                    what="the inbound message in the store")  # fmt: skip
    (item,) = kept.body["items"]
    assert (item["text"], item["direction"], item["chat"]) == (first, "in", "15550001@s.whatsapp.net")

    base = datetime.fromisoformat(item["at"].replace("Z", "+00:00")) + timedelta(seconds=1)
    seeded = [
        message_received("s1", IncomingMessage("+1555", f"x{n}", f"3EB1{n:06d}", f"c{n % 3}@s.whatsapp.net",
                                               base + timedelta(milliseconds=n // 5)))
        for n in range(10_000)
    ]  # fmt: skip
    asyncio.run(_seed(url, world.namespace, seeded))

    ids: list[str] = []
    cursor = ""
    pages = 0
    while True:
        page = http_json("GET", f"{messages}?limit=500{cursor}", token=world.token)
        assert page.status == 200, page.body
        ids += [m["id"] for m in page.body["items"]]
        pages += 1
        if "next" not in page.body:
            break
        cursor = f"&cursor={page.body['next']}"
    assert pages == 21  # 10,001 messages, 500 at a time
    assert ids[1:] == [e.data["id"] for e in sorted(seeded, key=lambda e: (e.time, e.data["id"]))]
    assert len(set(ids)) == 10_001

    chat = http_json("GET", f"{messages}?chat=c1@s.whatsapp.net&limit=5", token=world.token)
    assert [m["text"] for m in chat.body["items"]] == ["x1", "x4", "x7", "x10", "x13"]
    bad = http_json("GET", f"{messages}?cursor=forged", token=world.token)
    assert bad.status == 400
    assert "cursor" in bad.body["error"]
    listing = api_token(world.api, world.namespace, "sender-only",
                        rules=[{"apiGroups": ["waso.dev"], "resources": ["whatsappsessions/messages"],
                                "verbs": ["create"]}])  # fmt: skip
    refused = http_json("GET", messages, token=listing)
    assert refused.status == 403
    assert "may not list whatsappsessions/messages" in refused.body["error"]


async def _seed(url: str, tenant: str, events: list[SessionEvent]) -> None:
    store = MessageStore(url, tenant, 0)
    try:
        for start in range(0, len(events), 500):
            await store.record(events[start : start + 500])
    finally:
        await store.close()


def test_one_tenants_dead_endpoint_does_not_hold_back_anothers(
    world: World, receiver: Receiver, control_plane: ControlPlane, tenants: Tenants, tmp_path: Path
) -> None:
    """acme's endpoint is dead; globex (its own runtime process) delivers everything meanwhile."""
    globex = World(control_plane, tenants, world.simulator, tmp_path / "globex", tenant="globex")
    try:
        with running_receiver() as dead:
            dead.down()
            create_webhook(world, "app", dead.url, ["MessageReceived"])
            create_webhook(globex, "app", receiver.url, ["MessageReceived"])
            connected_runtime(world)
            connected_runtime(globex, phone=GLOBEX_PHONE)
            for n in range(30):
                inbound(world, n)
            texts = [inbound(globex, n, GLOBEX_PHONE) for n in range(30)]
            wait_for(lambda: len(receiver.events) == 30, timeout=60, what="globex's 30 events")
            assert_in_order_per_chat(receiver, texts)
            held = wait_for(lambda: (d := deliveries(world, "app")).get("backlog") == 30 and d, timeout=30,
                            what="acme's backlog")  # fmt: skip
            assert held["delivered"] == 0
    finally:
        globex.stop()
