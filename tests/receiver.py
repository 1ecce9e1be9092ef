"""A webhook receiver as an application would run one: checks signatures, drops repeats, can go down."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from tests.support import free_port

SIGNING_KEY = b"0123456789abcdef0123456789abcdef"


@dataclass
class Received:
    id: str
    type: str
    partition: str
    data: dict[str, Any]


@dataclass
class Receiver:
    """Every distinct event, in arrival order; attempts, repeats and bad signatures counted."""

    key: bytes = SIGNING_KEY
    port: int = field(default_factory=free_port)
    events: list[Received] = field(default_factory=list)
    attempts: int = 0
    repeats: int = 0
    bad_signatures: int = 0
    failing: int = 0
    """Answer this many more requests with 503 (a sick endpoint) before taking events again."""
    _loop: asyncio.AbstractEventLoop | None = None
    _site: web.TCPSite | None = None
    _runner: web.AppRunner | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.attempts += 1
            if self.failing > 0:
                self.failing -= 1
                return web.Response(status=503, text="not now")
            try:
                Verifier(self.key).verify(body, dict(request.headers), json_parse=False)
            except WebhookVerificationError:
                self.bad_signatures += 1
                return web.Response(status=401, text="bad signature")
            event = from_http_event(HTTPMessage(dict(request.headers), body))
            if event.get_id() != request.headers["webhook-id"]:
                self.bad_signatures += 1
                return web.Response(status=400, text="webhook-id is not the event's id")
            if any(e.id == event.get_id() for e in self.events):
                self.repeats += 1
            else:
                data = event.get_data()
                assert isinstance(data, dict)
                partition = str(event.get_extension("partitionkey"))
                self.events.append(Received(event.get_id(), event.get_type(), partition, data))
        return web.Response(status=204)

    def of_type(self, suffix: str) -> list[Received]:
        with self._lock:
            return [e for e in self.events if e.type.endswith(suffix)]

    # -- up and down, from the test's thread -----------------------------------------------

    def up(self) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._start_site(), self._loop).result(10)

    def down(self) -> None:
        """Stop listening: deliveries are refused at connect, as with a dead endpoint."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._stop_site(), self._loop).result(10)

    async def _start_site(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _stop_site(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None


@contextlib.contextmanager
def running_receiver(key: bytes = SIGNING_KEY) -> Iterator[Receiver]:
    receiver = Receiver(key=key)
    loop = asyncio.new_event_loop()
    receiver._loop = loop
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="receiver")
    thread.start()

    async def setup() -> None:
        app = web.Application()
        app.router.add_post("/events", receiver._handle)
        receiver._runner = web.AppRunner(app, shutdown_timeout=1, access_log=None)
        await receiver._runner.setup()

    asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
    receiver.up()
    try:
        yield receiver
    finally:
        runner = receiver._runner
        assert runner is not None
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
