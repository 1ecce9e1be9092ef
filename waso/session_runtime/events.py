"""Events out: a session's events, as signed CloudEvents, to the tenant's Webhooks.

A session never waits for an endpoint. ``EventHub.emit`` only queues (bounded); one task
per runtime takes the queue, records messages in the message store when there is one,
and writes one delivery per matching Webhook into the outbox. Per Webhook, ``LANES``
workers deliver: an event's lane is a hash of its partition (session and chat), and a
lane delivers strictly in order, retrying its head with back-off until the endpoint
takes it. So events of one chat arrive in order, a failing chat holds back a quarter of
the endpoint's traffic at most, and a dead endpoint holds back nothing of another
Webhook or tenant. The outbox is the message store's collection when there is one (a
restarted runtime delivers what it had accepted), else a bounded in-memory queue.

Deliveries are CloudEvents 1.0 in structured mode (``application/cloudevents+json``),
signed as Standard Webhooks specifies: headers ``webhook-id`` (the event id, stable
across retries), ``webhook-timestamp`` (of the attempt) and ``webhook-signature``
(``v1,`` base64 HMAC-SHA256 of ``id.timestamp.body``); a receiver checks the timestamp
against its replay window (the ``standardwebhooks`` libraries use five minutes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.v1.event import CloudEvent
from standardwebhooks.webhooks import Webhook as Signer

from waso.api.base import API_VERSION
from waso.api.webhook import EventType, ShardDeliveries, Webhook
from waso.session_runtime import metrics
from waso.session_runtime.backoff import Backoff
from waso.session_runtime.transport import IncomingMessage, MessageAck

log = logging.getLogger("waso.events")

LANES = 4
"""Ordered delivery lanes per Webhook."""
MIN_KEY_BYTES = 24
INTAKE_BATCH = 100
"""Events taken from the intake queue at once: one store round trip for a burst."""
MESSAGE_TYPES = (EventType.MESSAGE_RECEIVED, EventType.MESSAGE_SENT, EventType.MESSAGE_ACK)


@dataclass(frozen=True)
class SessionEvent:
    """Something that happened to a session, before it is addressed to any endpoint."""

    type: EventType
    session: str
    key: str
    """Unique among this session's events of this type, and the same when the event recurs (a redelivered
    message): the event id is made of it."""
    time: datetime
    data: dict[str, Any]
    chat: str | None = None
    """The chat a message event belongs to; events of one chat are delivered in order."""

    def id(self, namespace: str) -> str:
        return f"{namespace}/{self.session}/{self.type.value}/{self.key}"

    def partition(self) -> str:
        return f"{self.session}/{self.chat or ''}"


def cloud_event(namespace: str, event: SessionEvent) -> bytes:
    """The event as a structured-mode CloudEvent body."""
    attributes: dict[str, Any] = {
        "id": event.id(namespace),
        "type": event.type.cloud_event_type,
        "source": f"/apis/{API_VERSION}/namespaces/{namespace}/whatsappsessions/{event.session}",
        "time": event.time,
        "datacontenttype": "application/json",
        "partitionkey": event.partition(),
    }
    if event.chat:
        attributes["subject"] = event.chat
    return to_structured_event(CloudEvent(attributes, {"session": event.session, **event.data})).body


def signing_key(value: bytes) -> bytes:
    """The HMAC key of a Secret's value: ``whsec_`` and base64 as Standard Webhooks writes keys, else the bytes."""
    text = value.strip()
    if text.startswith(b"whsec_"):
        try:
            text = base64.b64decode(text[6:] + b"==", validate=False)
        except (binascii.Error, ValueError):
            raise ValueError("the whsec_ key is not base64") from None
    if len(text) < MIN_KEY_BYTES:
        raise ValueError(f"the signing key has {len(text)} bytes; at least {MIN_KEY_BYTES} are required")
    return text


def lane_of(partition: str) -> int:
    return zlib.crc32(partition.encode()) % LANES


@dataclass(frozen=True)
class Delivery:
    """One event for one Webhook, as the outbox keeps it."""

    webhook: str
    """The Webhook's uid: a Webhook deleted and created again with the same name starts with nothing."""
    lane: int
    seq: int
    event_id: str
    body: bytes


class Outbox(Protocol):
    """Deliveries waiting, in order per (webhook, lane)."""

    async def add(self, deliveries: list[Delivery]) -> int:
        """Keep these; returns how many were kept (a full in-memory outbox refuses)."""
        ...

    async def head(self, webhook: str, lane: int) -> Delivery | None: ...

    async def remove(self, delivery: Delivery) -> None: ...

    async def backlog(self, webhook: str) -> int: ...

    async def drop(self, webhook: str) -> None:
        """Forget a deleted Webhook's deliveries."""
        ...

    async def retain(self, webhooks: set[str]) -> None:
        """Forget the deliveries of every Webhook not named (deleted while this runtime was away)."""
        ...


class MemoryOutbox:
    """The outbox without a message store: bounded per Webhook (a dead endpoint fills only its own share), and
    lost with the process (docs/events.md)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        """Deliveries kept per Webhook."""
        self.lanes: dict[tuple[str, int], deque[Delivery]] = {}
        self.sizes: dict[str, int] = {}

    @property
    def size(self) -> int:
        return sum(self.sizes.values())

    async def add(self, deliveries: list[Delivery]) -> int:
        kept = 0
        for delivery in deliveries:
            if self.sizes.get(delivery.webhook, 0) >= self.capacity:
                continue
            self.lanes.setdefault((delivery.webhook, delivery.lane), deque()).append(delivery)
            self.sizes[delivery.webhook] = self.sizes.get(delivery.webhook, 0) + 1
            kept += 1
        return kept

    async def head(self, webhook: str, lane: int) -> Delivery | None:
        queue = self.lanes.get((webhook, lane))
        return queue[0] if queue else None

    async def remove(self, delivery: Delivery) -> None:
        queue = self.lanes.get((delivery.webhook, delivery.lane))
        if queue and queue[0] == delivery:
            queue.popleft()
            self.sizes[delivery.webhook] -= 1

    async def backlog(self, webhook: str) -> int:
        return sum(len(self.lanes.get((webhook, lane), ())) for lane in range(LANES))

    async def drop(self, webhook: str) -> None:
        for lane in range(LANES):
            self.lanes.pop((webhook, lane), None)
        self.sizes.pop(webhook, None)

    async def retain(self, webhooks: set[str]) -> None:
        for webhook in set(self.sizes) - webhooks:
            await self.drop(webhook)


class MessageRecorder(Protocol):
    """What the hub needs of the message store."""

    async def record(self, events: list[SessionEvent]) -> None: ...


class Sequence:
    """Increasing numbers that stay increasing across restarts (nanoseconds since the epoch, made unique)."""

    def __init__(self, now_ns: Callable[[], int]) -> None:
        self.now_ns = now_ns
        self.last = 0

    def next(self) -> int:
        self.last = max(self.last + 1, self.now_ns())
        return self.last


@dataclass
class Endpoint:
    """A Webhook as this runtime delivers to it."""

    webhook: Webhook
    key: bytes | None
    key_error: str | None
    stats: ShardDeliveries
    wake: list[asyncio.Event] = field(default_factory=lambda: [asyncio.Event() for _ in range(LANES)])
    """Set when a lane has something new: a delivery, or a change of the Webhook."""
    changed: list[asyncio.Event] = field(default_factory=lambda: [asyncio.Event() for _ in range(LANES)])
    """Set when the Webhook or its key changed: ends a failing lane's back-off (new deliveries do not)."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return self.webhook.metadata.uid or self.webhook.metadata.name

    @property
    def name(self) -> str:
        return self.webhook.metadata.name

    def wants(self, event: SessionEvent, labels: dict[str, str]) -> bool:
        spec = self.webhook.spec
        return event.type in spec.event_types and spec.session_selector.matches(labels)


class EventHub:
    """This runtime's events: intake, outbox, and delivery to its namespace's Webhooks."""

    def __init__(
        self,
        namespace: str,
        shard: int,
        outbox: Outbox,
        read_secret: Callable[[str, str], Any],
        labels_of: Callable[[str], dict[str, str]],
        *,
        recorder: MessageRecorder | None = None,
        transient: tuple[type[Exception], ...] = (),
        intake_capacity: int = 10000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        backoff: Callable[[], Backoff] = lambda: Backoff(base=0.5, cap=30.0),
    ) -> None:
        self.namespace = namespace
        self.shard = shard
        self.outbox = outbox
        self.read_secret = read_secret
        """``await read_secret(name, key)``: the bytes of a key of a Secret in the namespace; raises on failure."""
        self.labels_of = labels_of
        self.recorder = recorder
        self.transient = transient
        """Failures of the store that pass (it is retried); any other failure drops the event (counted)."""
        self.clock = clock
        self.backoff = backoff
        self.intake: asyncio.Queue[SessionEvent] = asyncio.Queue(intake_capacity)
        self.endpoints: dict[str, Endpoint] = {}
        self.subscribed = asyncio.Event()
        """Set once the namespace's Webhooks have been listed: the intake waits for it."""
        self.sequence = Sequence(lambda: int(clock().timestamp() * 1e9))
        self.http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- intake -----------------------------------------------------------------------------

    def emit(self, event: SessionEvent) -> None:
        """Queue an event; never waits. A full queue drops it (counted), so a session never stalls."""
        try:
            self.intake.put_nowait(event)
        except asyncio.QueueFull:
            metrics.EVENTS_DROPPED.labels(self.namespace, "intake-full").inc()

    async def _take(self) -> None:
        await self.subscribed.wait()  # events of the first moments wait for the Webhooks, not dropped before them
        backoff = self.backoff()
        while True:
            batch = [await self.intake.get()]
            while len(batch) < INTAKE_BATCH and not self.intake.empty():
                batch.append(self.intake.get_nowait())
            try:
                plan = self.plan(batch)  # once: a retry keeps the sequence numbers, so a partial insert keeps order
                while True:
                    try:
                        await self.accept(batch, plan)
                        backoff.reset()
                        break
                    except self.transient as error:
                        # The store is down: events wait in the intake queue (bounded) until it is back.
                        log.warning("message store unavailable, %d event(s) wait: %s", len(batch), error)
                        await asyncio.sleep(backoff.next())
                    except Exception:
                        log.exception("%d event(s) not accepted", len(batch))
                        metrics.EVENTS_DROPPED.labels(self.namespace, "error").inc(len(batch))
                        break
            finally:
                for _ in batch:
                    self.intake.task_done()

    def plan(self, events: list[SessionEvent]) -> tuple[list[Delivery], list[tuple[Endpoint, int]]]:
        """One delivery per interested Webhook, numbered in the events' order, and the lanes to wake."""
        deliveries: list[Delivery] = []
        woken: list[tuple[Endpoint, int]] = []
        for event in events:
            labels = self.labels_of(event.session)
            interested = [e for e in self.endpoints.values() if e.wants(event, labels)]
            if not interested:
                continue
            body = cloud_event(self.namespace, event)
            lane = lane_of(event.partition())
            event_id = event.id(self.namespace)
            deliveries += [Delivery(e.uid, lane, self.sequence.next(), event_id, body) for e in interested]
            woken += [(e, lane) for e in interested]
        return deliveries, woken

    async def accept(
        self, events: list[SessionEvent], plan: tuple[list[Delivery], list[tuple[Endpoint, int]]] | None = None
    ) -> None:
        """Record the messages, and put the deliveries of ``plan`` (default: planned now) in the outbox."""
        messages = [e for e in events if e.type in MESSAGE_TYPES]
        if self.recorder is not None and messages:
            await self.recorder.record(messages)
        deliveries, woken = plan if plan is not None else self.plan(events)
        if not deliveries:
            return
        kept = await self.outbox.add(deliveries)
        if kept < len(deliveries):
            metrics.EVENTS_DROPPED.labels(self.namespace, "outbox-full").inc(len(deliveries) - kept)
        for endpoint, lane in woken[:kept]:
            endpoint.wake[lane].set()

    # -- endpoints --------------------------------------------------------------------------

    async def update(self, webhook: Webhook) -> None:
        """A Webhook was created or changed: (re)read its key, (re)start its lanes."""
        uid = webhook.metadata.uid or webhook.metadata.name
        endpoint = self.endpoints.get(uid)
        key, key_error = await self._key(webhook)
        if endpoint is None:
            stats = ShardDeliveries(shard=self.shard)
            endpoint = Endpoint(webhook, key, key_error, stats)
            self.endpoints[uid] = endpoint
            endpoint.tasks = [self._spawn(self._deliver(endpoint, lane), f"deliver:{webhook.metadata.name}:{lane}")
                              for lane in range(LANES)]  # fmt: skip
        else:
            endpoint.webhook, endpoint.key, endpoint.key_error = webhook, key, key_error
        if key_error is not None:
            endpoint.stats = endpoint.stats.model_copy(update=dict(last_error=key_error))
        _wake_all(endpoint)

    async def refresh_keys(self) -> None:
        """Read every signing key again: a rotated Secret, or a Role granted since."""
        for endpoint in list(self.endpoints.values()):
            webhook = endpoint.webhook
            key, key_error = await self._key(webhook)
            if endpoint.webhook is not webhook:
                continue  # changed meanwhile: update() read the key of the new spec
            changed = key != endpoint.key
            endpoint.key, endpoint.key_error = key, key_error
            if changed and key is not None:
                _wake_all(endpoint)

    async def remove(self, uid: str) -> None:
        """A Webhook was deleted: stop its lanes and forget what it had not received."""
        endpoint = self.endpoints.pop(uid, None)
        if endpoint is None:
            return
        for task in endpoint.tasks:
            task.cancel()
        await asyncio.gather(*endpoint.tasks, return_exceptions=True)
        try:
            await self.outbox.drop(uid)
        except self.transient as error:  # what is left is dropped at the next listing (retain)
            log.warning("deliveries of a deleted Webhook not dropped yet: %s", error)

    async def retain(self, uids: set[str]) -> None:
        """After a full listing: forget deliveries to Webhooks deleted while this runtime did not watch."""
        try:
            await self.outbox.retain(uids)
        except self.transient as error:
            log.warning("deliveries of deleted Webhooks not dropped yet: %s", error)

    async def _key(self, webhook: Webhook) -> tuple[bytes | None, str | None]:
        ref = webhook.spec.secret_ref
        try:
            return signing_key(await self.read_secret(ref.name, ref.key)), None
        except Exception as error:
            return None, f"signing key {ref.name}/{ref.key} not usable: {error}"[:1024]

    # -- delivery ---------------------------------------------------------------------------

    async def _deliver(self, endpoint: Endpoint, lane: int) -> None:
        """Deliver the lane's head until the endpoint takes it, then the next; wait when there is none."""
        wake, changed = endpoint.wake[lane], endpoint.changed[lane]
        backoff = self.backoff()
        while True:
            wake.clear()
            try:
                delivery = await self.outbox.head(endpoint.uid, lane)
            except self.transient as unavailable:
                log.warning("outbox unavailable for %s: %s", endpoint.name, unavailable)
                await asyncio.sleep(backoff.next())
                continue
            if delivery is None or endpoint.key is None or endpoint.webhook.spec.suspend:
                await wake.wait()
                continue
            error = await self._post(endpoint, delivery, endpoint.key)
            now = self.clock()
            if error is None:
                with contextlib.suppress(*self.transient):
                    # Not removed: delivered again later (at least once), with the same id.
                    await self.outbox.remove(delivery)
                backoff.reset()
                endpoint.stats = endpoint.stats.model_copy(
                    update=dict(
                        delivered=endpoint.stats.delivered + 1,
                        consecutive_failures=0,
                        last_success_at=now,
                    )
                )
                metrics.EVENTS_DELIVERED.labels(self.namespace, endpoint.name).inc()
                continue
            endpoint.stats = endpoint.stats.model_copy(
                update=dict(
                    failures=endpoint.stats.failures + 1,
                    consecutive_failures=endpoint.stats.consecutive_failures + 1,
                    last_failure_at=now,
                    last_error=error[:1024],
                )
            )
            metrics.EVENT_FAILURES.labels(self.namespace, endpoint.name).inc()
            changed.clear()
            with contextlib.suppress(TimeoutError):
                # A changed Webhook (a fixed URL, a new key) is tried at once; new deliveries do not cut it short.
                await asyncio.wait_for(changed.wait(), backoff.next())

    async def _post(self, endpoint: Endpoint, delivery: Delivery, key: bytes) -> str | None:
        """One attempt; None when the endpoint took the event, else why not."""
        assert self.http is not None
        spec = endpoint.webhook.spec
        now = self.clock()
        signature = Signer(key).sign(delivery.event_id, now, delivery.body.decode())
        headers = {
            "Content-Type": "application/cloudevents+json",
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
            "User-Agent": "waso-runtime",
        }
        try:
            timeout = aiohttp.ClientTimeout(total=spec.timeout_seconds)
            async with self.http.post(spec.url, data=delivery.body, headers=headers, timeout=timeout) as response:
                if 200 <= response.status < 300:
                    return None
                return f"{response.status} {response.reason or ''} from {spec.url}".strip()
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return f"{type(error).__name__} posting to {spec.url}: {error}"

    # -- status -----------------------------------------------------------------------------

    async def report(self) -> list[tuple[Webhook, ShardDeliveries]]:
        """Each endpoint's deliveries from this shard, with the current backlog."""
        reports = []
        for endpoint in list(self.endpoints.values()):
            backlog = await self.outbox.backlog(endpoint.uid)
            metrics.EVENT_BACKLOG.labels(self.namespace, endpoint.name).set(backlog)
            stats = endpoint.stats.model_copy(update=dict(backlog=backlog))
            if endpoint.key_error is not None:
                stats = stats.model_copy(update=dict(last_error=endpoint.key_error))
            reports.append((endpoint.webhook, stats))
        return reports

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self._spawn(self._take(), "events-intake")

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Put what the intake holds into the outbox (bounded), then stop."""
        if self.subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.intake.join(), drain_seconds)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _wake_all(endpoint: Endpoint) -> None:
    for event in (*endpoint.wake, *endpoint.changed):
        event.set()


# -- what happened, as events ----------------------------------------------------------------


def chat_of(phone: str) -> str:
    """The chat JID of a direct conversation with an E.164 number."""
    return f"{phone.removeprefix('+')}@s.whatsapp.net"


def message_received(session: str, message: IncomingMessage) -> SessionEvent:
    data = {"id": message.id, "from": message.sender, "chat": message.chat, "text": message.text}
    return SessionEvent(EventType.MESSAGE_RECEIVED, session, message.id, message.at, data, message.chat)


def message_sent(session: str, message_id: str, to: str, text: str, at: datetime) -> SessionEvent:
    chat = chat_of(to)
    data = {"id": message_id, "to": to, "chat": chat, "text": text}
    return SessionEvent(EventType.MESSAGE_SENT, session, message_id, at, data, chat)


def message_acked(session: str, ack: MessageAck) -> SessionEvent:
    ids = sorted(ack.ids)
    digest = hashlib.sha256(",".join(ids).encode()).hexdigest()[:16] if len(ids) > 1 else ids[0]
    data = {"ids": ids, "chat": ack.chat, "status": ack.status.value}
    return SessionEvent(EventType.MESSAGE_ACK, session, f"{digest}/{ack.status.value}", ack.at, data, ack.chat)


def status_changed(session: str, state: str, jid: str | None, error: str | None, at: datetime) -> SessionEvent:
    data = {"state": state, "jid": jid, "lastError": error}
    return SessionEvent(EventType.SESSION_STATUS, session, f"{state}/{at.timestamp():.6f}", at, data)


def qr_offered(session: str, payload: dict[str, Any], at: datetime) -> SessionEvent:
    key = hashlib.sha256(str(payload.get("code", "")).encode()).hexdigest()[:16]
    return SessionEvent(EventType.QR_CODE, session, key, at, payload)


def paired(session: str, jid: str, at: datetime) -> SessionEvent:
    return SessionEvent(EventType.PAIRED, session, jid, at, {"jid": jid})
