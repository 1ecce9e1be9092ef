"""One supervisor per session: lease, connect, follow the transport's events, back off, report.

The supervisor owns the session's lifecycle on this pod. It connects only while it
holds the session's Lease (never two live sockets on one credential), reconnects with
jittered exponential back-off (no busy loop when WhatsApp is unreachable), and reports
``status.runtime`` through the reporter, which writes only changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from waso.api.base import format_timestamp
from waso.api.jid import parse_jid
from waso.api.session import RuntimeState
from waso.session_runtime.lease_keeper import session_lease_name
from waso.session_runtime.leases import still_held
from waso.session_runtime.transport import (
    Connected,
    Disconnected,
    IncomingMessage,
    LoggedOut,
    Paired,
    QrCode,
    SessionIdentity,
    StreamReplaced,
    TemporaryBan,
    Transport,
    TransportEvent,
)

log = logging.getLogger("waso.runtime")
ACTIVITY_GRANULARITY = timedelta(seconds=60)


class Backoff:
    """Exponential back-off with full jitter, reset after a successful connection."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Leases(Protocol):
    """What a supervisor needs of leases (LeaseKeeper in the runtime)."""

    duration: int

    async def hold(self, name: str) -> datetime | None: ...

    async def release(self, name: str) -> None: ...


Reporter = Callable[[str, dict[str, Any]], Awaitable[None]]
Listener = asyncio.Queue[tuple[str, dict[str, Any]]]


class SessionSupervisor:
    def __init__(
        self,
        identity: SessionIdentity,
        transport_factory: Callable[[SessionIdentity], Transport],
        leases: Leases,
        report: Reporter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        backoff: Backoff | None = None,
    ) -> None:
        self.identity = identity
        self.transport_factory = transport_factory
        self.leases = leases
        self.report_to = report
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.lease_name = session_lease_name(identity.name)
        self.wanted = asyncio.Event()
        self.unwanted = asyncio.Event()
        self.unwanted.set()
        self.lease_lost = asyncio.Event()
        self.closing = asyncio.Event()
        self.closed = False
        self.transport: Transport | None = None
        self.listeners: set[Listener] = set()
        self.state = RuntimeState.STOPPED
        self.jid: str | None = None
        self.stored_jid: str | None = None
        self.push_name: str | None = None
        self.connected_at: datetime | None = None
        self.last_activity: datetime | None = None
        self.reported_activity: datetime | None = None
        self.qr: QrCode | None = None
        self.last_error: str | None = None
        self.task: asyncio.Task[None] | None = None

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"session:{self.identity.name}")

    def want(self, running: bool) -> None:
        if running and not self.closed:
            self.unwanted.clear()
            self.wanted.set()
        else:
            self.wanted.clear()
            self.unwanted.set()

    async def close(self) -> None:
        """Disconnect, release the lease, write a final status, and end."""
        self.closed = True
        self.closing.set()
        self.want(False)
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # -- the lifecycle ----------------------------------------------------------------------

    async def _run(self) -> None:
        await self._report()
        while not self.closed:
            await _first(self.wanted.wait(), self.closing.wait())
            if self.closed:
                break
            renewed = await self._acquire()
            if renewed is None:
                continue
            self.lease_lost.clear()
            renewer = asyncio.create_task(self._keep_lease(renewed))
            try:
                while self.wanted.is_set() and not self.lease_lost.is_set():
                    delay = await self._connect_once()
                    if not self.wanted.is_set() or self.lease_lost.is_set():
                        break
                    log.info("%s: reconnecting in %.1fs", self.identity.name, delay)
                    await _first(asyncio.sleep(delay), self.unwanted.wait(), self.lease_lost.wait())
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
                if not self.lease_lost.is_set():
                    await self.leases.release(self.lease_name)
            self._set(RuntimeState.STOPPED)
            self.qr = None
            await self._report()
        await self._report()

    async def _acquire(self) -> datetime | None:
        """Wait for the session's lease; None if the session stopped being wanted meanwhile."""
        while self.wanted.is_set():
            try:
                renewed = await self.leases.hold(self.lease_name)
            except Exception as error:
                log.warning("%s: lease not readable: %s", self.identity.name, error)
                renewed = None
            if renewed is not None:
                return renewed
            await _first(asyncio.sleep(max(1.0, self.leases.duration / 3)), self.unwanted.wait())
        return None

    async def _keep_lease(self, renewed: datetime) -> None:
        interval = max(1.0, self.leases.duration / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                result = await self.leases.hold(self.lease_name)
            except Exception as error:
                log.warning("%s: lease renewal failed: %s", self.identity.name, error)
                result = None
            if result is not None:
                renewed = result
            elif not still_held(renewed, self.leases.duration, self.clock()):
                log.warning("%s: lease lost; disconnecting", self.identity.name)
                self.lease_lost.set()
                return

    async def _connect_once(self) -> float:
        """One connection attempt; returns the delay before the next one."""
        transport = self.transport_factory(self.identity)
        self.transport = transport
        self.stored_jid = transport.stored_jid()
        self._set(RuntimeState.CONNECTING)
        await self._report()
        await transport.start()
        try:
            while True:
                event = await _first(transport.events.get(), self.unwanted.wait(), self.lease_lost.wait())
                if event is None:
                    return 0.0
                delay = await self._on_event(event)
                if delay is not None:
                    return delay
        finally:
            self.transport = None
            await transport.stop()

    async def _on_event(self, event: TransportEvent) -> float | None:
        """Apply one transport event and report; a delay when the event ended the connection."""
        delay = self._apply(event)
        await self._report()
        return delay

    def _apply(self, event: TransportEvent) -> float | None:
        name = self.identity.name
        if isinstance(event, QrCode):
            self.qr = event
            self._set(RuntimeState.AWAITING_PAIRING)
            self._notify("qr", qr_payload(event))
        elif isinstance(event, Paired):
            self.stored_jid = event.jid
            self.qr = None
            self._notify("paired", {"jid": event.jid})
        elif isinstance(event, Connected):
            self.qr = None
            self.jid, self.push_name = event.jid, event.push_name
            self.connected_at = self.clock()
            self.last_error = None
            self.stored_jid = self.stored_jid or (self.transport.stored_jid() if self.transport else None)
            self.backoff.reset()
            self._set(RuntimeState.CONNECTED)
            log.info("%s: connected as %s", name, event.jid)
        elif isinstance(event, IncomingMessage):
            self.touch()
        elif isinstance(event, LoggedOut):
            self._lost_identity(RuntimeState.LOGGED_OUT, f"logged out: {event.reason}")
            return self.backoff.next()
        elif isinstance(event, StreamReplaced):
            self._disconnected(
                RuntimeState.DISCONNECTED, "stream replaced: another client connected with these credentials"
            )
            return max(60.0, self.backoff.next())
        elif isinstance(event, TemporaryBan):
            until = event.until.isoformat() if event.until else "unknown"
            self._disconnected(RuntimeState.BANNED, f"{event.reason} until {until}")
            remaining = (event.until - self.clock()).total_seconds() if event.until else 60.0
            return max(remaining, self.backoff.next())
        elif isinstance(event, Disconnected):
            self._disconnected(RuntimeState.DISCONNECTED, event.error)
            return self.backoff.next()
        return None

    def _disconnected(self, state: RuntimeState, error: str) -> None:
        self.last_error = error
        self.connected_at = None
        self.qr = None
        self._set(state)
        log.info("%s: %s (%s)", self.identity.name, state.value, error)

    def _lost_identity(self, state: RuntimeState, error: str) -> None:
        self.jid = None
        self.stored_jid = None
        self._disconnected(state, error)

    async def _report(self) -> None:
        if self.closed and self.state != RuntimeState.STOPPED:
            return
        await self.report_to(self.identity.name, self.runtime_status())
        self._notify("status", {"state": self.state.value, "jid": self.jid, "lastError": self.last_error})

    # -- what others read -------------------------------------------------------------------

    def _set(self, state: RuntimeState) -> None:
        self.state = state

    def touch(self) -> None:
        self.last_activity = self.clock()

    def runtime_status(self) -> dict[str, Any]:
        if self.last_activity is not None and (
            self.reported_activity is None or self.last_activity - self.reported_activity >= ACTIVITY_GRANULARITY
        ):
            self.reported_activity = self.last_activity
        parsed = parse_jid(self.jid) if self.jid else None
        connected = self.state == RuntimeState.CONNECTED
        status: dict[str, Any] = {
            "state": self.state.value,
            "jid": self.jid if connected else None,
            "deviceId": parsed.device if parsed and connected else None,
            "storedJid": self.stored_jid,
            "pushName": self.push_name,
            "connectedAt": format_timestamp(self.connected_at) if self.connected_at and connected else None,
            "lastActivityAt": format_timestamp(self.reported_activity) if self.reported_activity else None,
            "qrExpiresAt": format_timestamp(self.qr.expires_at) if self.qr else None,
            "lastError": self.last_error,
        }
        return {k: v for k, v in status.items() if v is not None}

    def _notify(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener.put_nowait((event, data))


def qr_payload(qr: QrCode) -> dict[str, Any]:
    """The data of a `qr` Server-Sent Event."""
    return {"code": qr.code, "expiresAt": format_timestamp(qr.expires_at)}


async def _first(*awaitables: Awaitable[Any]) -> Any:
    """Wait for the first awaitable to finish, cancel the rest, return its result (None if not the first)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    first = tasks[0]
    return first.result() if first in done else None
