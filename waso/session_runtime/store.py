"""The message store: a tenant's messages and its events' outbox, in MongoDB (PyMongo's async API).

One database (``waso`` unless the URL names another) holds every tenant's documents,
each with its ``tenant`` (namespace): a runtime serves one tenant and only ever reads
and writes its own. Messages are kept ``messageRetentionDays`` and at most
``maxStoredMessages`` per tenant (TenantQuota); ``prune`` enforces both. The outbox
(``waso.session_runtime.events``) is a collection too, so an event accepted before a
restart is delivered after it.

Only what MongoDB-wire servers have in common is used (plain CRUD, compound indexes,
sorts, ``$or``; no TTL index, transaction or change stream), so FerretDB serves as well
as MongoDB (docs/events.md lists the versions).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from waso.api.webhook import EventType
from waso.session_runtime import metrics
from waso.session_runtime.events import Delivery, SessionEvent

log = logging.getLogger("waso.store")

ACK_ORDER = ("sent", "server", "delivered", "read")
"""A message's delivery status only moves forward: a late 'delivered' never hides 'read'."""
MAX_PAGE = 500
DUPLICATE_KEY = 11000


class BadCursor(ValueError):
    """A page cursor that this store did not hand out."""


class PoolMetrics(monitoring.ConnectionPoolListener):
    """The connection pool, as metrics: the seed's gateway ran out of pooled connections unseen."""

    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None:
        metrics.STORE_POOL_SIZE.set(event.options.get("maxPoolSize", 100))

    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None:
        pass

    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        pass

    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None:
        pass

    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None:
        metrics.STORE_CONNECTIONS.labels("open").inc()

    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None:
        pass

    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        metrics.STORE_CONNECTIONS.labels("open").dec()

    def connection_check_out_started(self, event: monitoring.ConnectionCheckOutStartedEvent) -> None:
        pass

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent) -> None:
        metrics.STORE_CHECKOUT_FAILURES.labels(str(event.reason)).inc()

    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        metrics.STORE_CONNECTIONS.labels("in_use").inc()

    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None:
        metrics.STORE_CONNECTIONS.labels("in_use").dec()


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None
    """The cursor of the next page; None on the last."""


def _ms(value: datetime) -> datetime:
    """Milliseconds, as BSON keeps dates: a cursor compares exactly what was stored."""
    return value.astimezone(UTC).replace(microsecond=value.microsecond // 1000 * 1000)


def encode_cursor(at: datetime, key: str) -> str:
    raw = json.dumps([int(_ms(at).timestamp() * 1000), key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at_ms, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(at_ms, int) or not isinstance(key, str):
            raise TypeError
        return datetime.fromtimestamp(at_ms / 1000, UTC), key
    except (binascii.Error, ValueError, TypeError, OverflowError, OSError):
        raise BadCursor("cursor is not one this API returned") from None


class MessageStore:
    """Messages and the outbox of one tenant's runtime shard."""

    def __init__(self, url: str, tenant: str, shard: int, max_pool_size: int = 10) -> None:
        self.tenant = tenant
        self.shard = shard
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url,
            maxPoolSize=max_pool_size,
            tz_aware=True,
            serverSelectionTimeoutMS=5000,
            event_listeners=[PoolMetrics()],
            appname="waso-runtime",
        )
        database = self.client.get_default_database("waso")
        self.messages = database["messages"]
        self.outbox = database["outbox"]

    async def setup(self) -> None:
        await self.messages.create_index([("tenant", ASCENDING), ("session", ASCENDING), ("at", ASCENDING)])
        await self.messages.create_index([("tenant", ASCENDING), ("at", ASCENDING)])
        await self.outbox.create_index(
            [
                ("tenant", ASCENDING),
                ("shard", ASCENDING),
                ("webhook", ASCENDING),
                ("lane", ASCENDING),
                ("seq", ASCENDING),
            ]
        )

    async def close(self) -> None:
        await self.client.close()

    # -- messages ---------------------------------------------------------------------------

    def _key(self, session: str, message_id: str) -> str:
        return f"{self.tenant}/{session}/{message_id}"

    async def record(self, events: list[SessionEvent]) -> None:
        """Messages in or out (each kept once: a redelivered message changes nothing), then receipts."""
        documents = [self._document(e) for e in events if e.type != EventType.MESSAGE_ACK]
        if documents:
            await _insert_new(self.messages, documents)
        for event in events:
            if event.type == EventType.MESSAGE_ACK:
                status = str(event.data["status"])
                earlier = list(ACK_ORDER[: ACK_ORDER.index(status)]) if status in ACK_ORDER else []
                keys = [self._key(event.session, str(i)) for i in event.data["ids"]]
                await self.messages.update_many(
                    {"_id": {"$in": keys}, "status": {"$in": earlier}}, {"$set": {"status": status}}
                )

    def _document(self, event: SessionEvent) -> dict[str, Any]:
        data = event.data
        inbound = event.type == EventType.MESSAGE_RECEIVED
        return {
            "_id": self._key(event.session, str(data["id"])),
            "tenant": self.tenant,
            "session": event.session,
            "id": str(data["id"]),
            "chat": event.chat or "",
            "direction": "in" if inbound else "out",
            "from": data.get("from"),
            "to": data.get("to"),
            "text": data.get("text", ""),
            "at": _ms(event.time),
            "status": "received" if inbound else "sent",
        }

    async def page(
        self,
        session: str,
        *,
        chat: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        """Messages of a session, oldest first, ``limit`` at a time; raises BadCursor."""
        query: dict[str, Any] = {"tenant": self.tenant, "session": session}
        if chat is not None:
            query["chat"] = chat
        at: dict[str, Any] = {}
        if since is not None:
            at["$gte"] = _ms(since)
        if until is not None:
            at["$lt"] = _ms(until)
        if at:
            query["at"] = at
        if cursor is not None:
            after_at, after_key = decode_cursor(cursor)
            query["$or"] = [{"at": {"$gt": after_at}}, {"at": after_at, "_id": {"$gt": after_key}}]
        found = self.messages.find(query).sort([("at", ASCENDING), ("_id", ASCENDING)]).limit(limit + 1)
        documents = await found.to_list(length=limit + 1)
        more = len(documents) > limit
        documents = documents[:limit]
        items = [_public(d) for d in documents]
        last = documents[-1] if documents else None
        return Page(items, encode_cursor(last["at"], last["_id"]) if more and last is not None else None)

    async def prune(self, retention_days: int, max_messages: int, now: datetime) -> int:
        """Enforce the tenant's retention and size cap; the number of messages removed."""
        removed = await self.messages.delete_many(
            {"tenant": self.tenant, "at": {"$lt": _ms(now - timedelta(days=retention_days))}}
        )
        deleted = removed.deleted_count
        if await self.messages.count_documents({"tenant": self.tenant}) > max_messages:
            newest_first = [("at", DESCENDING), ("_id", DESCENDING)]
            boundary = (
                await self.messages.find({"tenant": self.tenant})
                .sort(newest_first)
                .skip(max_messages)
                .limit(1)
                .to_list(1)
            )
            if boundary:
                edge = boundary[0]
                older = {"$or": [{"at": {"$lt": edge["at"]}}, {"at": edge["at"], "_id": {"$lte": edge["_id"]}}]}
                deleted += (await self.messages.delete_many({"tenant": self.tenant, **older})).deleted_count
        return deleted

    # -- the outbox (waso.session_runtime.events.Outbox) -----------------------------------

    def _lane(self, webhook: str, lane: int | None = None) -> dict[str, Any]:
        query: dict[str, Any] = {"tenant": self.tenant, "shard": self.shard, "webhook": webhook}
        if lane is not None:
            query["lane"] = lane
        return query

    async def add(self, deliveries: list[Delivery]) -> int:
        documents = [
            {
                "_id": f"{d.webhook}/{d.event_id}",
                **self._lane(d.webhook, d.lane),
                "seq": d.seq,
                "eventId": d.event_id,
                "body": d.body,
            }
            for d in deliveries
        ]
        # The same event again (a redelivered message) is in the outbox already, which is what counts.
        await _insert_new(self.outbox, documents)
        return len(documents)

    async def head(self, webhook: str, lane: int) -> Delivery | None:
        found = await self.outbox.find(self._lane(webhook, lane)).sort("seq", ASCENDING).limit(1).to_list(1)
        if not found:
            return None
        d = found[0]
        return Delivery(webhook, lane, int(d["seq"]), str(d["eventId"]), bytes(d["body"]))

    async def remove(self, delivery: Delivery) -> None:
        await self.outbox.delete_one({"_id": f"{delivery.webhook}/{delivery.event_id}"})

    async def backlog(self, webhook: str) -> int:
        return await self.outbox.count_documents(self._lane(webhook))

    async def drop(self, webhook: str) -> None:
        await self.outbox.delete_many(self._lane(webhook))

    async def retain(self, webhooks: set[str]) -> None:
        query = {"tenant": self.tenant, "shard": self.shard, "webhook": {"$nin": sorted(webhooks)}}
        await self.outbox.delete_many(query)


async def _insert_new(collection: AsyncCollection[dict[str, Any]], documents: list[dict[str, Any]]) -> None:
    """Insert what is not there yet (by _id); one round trip however many there are."""
    try:
        await collection.insert_many(documents, ordered=False)
    except BulkWriteError as error:
        if any(e.get("code") != DUPLICATE_KEY for e in error.details.get("writeErrors", [])):
            raise


def _public(document: dict[str, Any]) -> dict[str, Any]:
    """A stored message as the read API shows it."""
    item = {k: v for k, v in document.items() if k not in ("_id", "tenant") and v is not None}
    item["at"] = _ms(document["at"]).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace("000Z", "Z")
    return item
