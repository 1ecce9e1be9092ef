"""One supervisor per session: lease, connect, follow the transport's events, back off, report.

The supervisor carries out the session's state machine (``lifecycle.step``) on this pod.
It connects only while it holds the session's Lease (never two live sockets on one
credential) and reports ``status.runtime`` only while it holds it too: a standby or a
process whose lease lapsed never writes, and a new holder reports the true state as
soon as it acts. It reconnects with jittered exponential back-off (no busy loop when
WhatsApp is unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from waso import logs
from waso.api.session import RepairReport, RepairRequest, RuntimeState, RuntimeStatus
from waso.leases import still_held
from waso.session_runtime import events, metrics
from waso.session_runtime.backoff import Backoff
from waso.session_runtime.events import SessionEvent
from waso.session_runtime.lifecycle import (
    Activity,
    Connecting,
    Event,
    Notify,
    Repaired,
    SessionView,
    Stopped,
    runtime_status,
    step,
)
from waso.session_runtime.transport import (
    Disconnected,
    IncomingMessage,
    MessageAck,
    OutgoingMessage,
    QrCode,
    SessionIdentity,
    Transport,
)
from waso.tasks import first_of

log = logging.getLogger("waso.runtime")
MANAGER = "waso-runtime"
"""The runtime's field manager: status.runtime, Leases, Webhook status (with the shard appended)."""


def session_lease_name(session: str) -> str:
    return f"waso-session-{session}"


class Leases(Protocol):
    """What a supervisor needs of leases (LeaseKeeper in the runtime)."""

    duration: int

    async def hold(self, name: str) -> datetime | None: ...

    async def release(self, name: str) -> None: ...

    def retry_after(self, name: str) -> float:
        """Seconds until another try to acquire ``name`` is worth it."""
        ...


Reporter = Callable[[str, RuntimeStatus], Awaitable[object]]
Repairer = Callable[[SessionIdentity, RepairRequest], RepairReport]
"""Backs up and resets a session's credential store (blocking: it runs in a thread)."""
Listener = asyncio.Queue[tuple[str, dict[str, Any]]]


class SessionSupervisor:
    """Runs one session on this runtime; reports its status only while holding the session's Lease."""

    def __init__(
        self,
        identity: SessionIdentity,
        transport_factory: Callable[[SessionIdentity], Transport],
        leases: Leases,
        report: Reporter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        backoff: Backoff | None = None,
        repairer: Repairer | None = None,
        emit: Callable[[SessionEvent], None] = lambda event: None,
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
        self.renewed: datetime | None = None
        """When this process last renewed the session's Lease; None while it does not hold it."""
        self.transport: Transport | None = None
        self.listeners: set[Listener] = set()
        self.view = SessionView()
        self.task: asyncio.Task[None] | None = None
        self._reporting = asyncio.Lock()
        self.repairer = repairer
        self.emit = emit
        """Hands the session's events to the runtime's EventHub (which never makes a session wait)."""
        self.pending_repair: RepairRequest | None = None
        self.repairing: str | None = None
        """The id of the repair being carried out (a watch event meanwhile must not queue it again)."""
        self.repair_wanted = asyncio.Event()

    @property
    def state(self) -> RuntimeState:
        return self.view.state

    @property
    def qr(self) -> QrCode | None:
        return self.view.qr

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(
            self._run(), name=f"session:{self.identity.name}", context=logs.session_context(self.identity.name)
        )

    def want(self, running: bool) -> None:
        if running and not self.closed:
            self.unwanted.clear()
            self.wanted.set()
        else:
            self.wanted.clear()
            self.unwanted.set()

    async def close(self) -> None:
        """Disconnect, write the final status and release the lease (if held), and end."""
        self.closed = True
        self.closing.set()
        self.want(False)
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def request_repair(self, request: RepairRequest) -> None:
        """Back up, reset and re-pair at the next chance while holding the lease (once per request id)."""
        done = self.view.last_repair
        if self.repairer is None or request.id in (self.repairing, done.id if done is not None else None):
            return
        if self.pending_repair is None or self.pending_repair.id != request.id:
            self.pending_repair = request
            self.repair_wanted.set()

    def holds_lease(self) -> bool:
        """Fencing: only the Lease holder writes the session's status.runtime."""
        return self.renewed is not None and still_held(self.renewed, self.leases.duration, self.clock())

    # -- the lifecycle ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.closed:
            await first_of(self.wanted.wait(), self.closing.wait())
            if self.closed:
                break
            renewed = await self._acquire()
            if renewed is None:
                continue
            self.renewed = renewed
            self.lease_lost.clear()
            renewer = asyncio.create_task(self._keep_lease())
            try:
                while self.wanted.is_set() and not self.lease_lost.is_set():
                    if self.pending_repair is not None:
                        await self._repair()  # the socket is closed and the lease held: nobody uses the store
                    try:
                        delay = await self._connect_once()
                    except Exception as error:  # a transport that cannot even start: retried like a drop
                        log.exception("connection attempt failed")
                        ended = await self._apply(Disconnected(f"connection attempt failed: {error}"))
                        delay = self.backoff.next() if ended is None else ended
                    if not self.wanted.is_set() or self.lease_lost.is_set():
                        break
                    log.info("reconnecting in %.1fs", delay)
                    await first_of(asyncio.sleep(delay), self.unwanted.wait(), self.lease_lost.wait())
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
                await self._apply(Stopped())  # reported while the lease is still held, never after
                if not self.lease_lost.is_set():
                    try:
                        await self.leases.release(self.lease_name)
                    except Exception as error:  # it expires by itself
                        log.warning("lease not released: %s", error)
                self.renewed = None

    async def _acquire(self) -> datetime | None:
        """Wait for the session's lease; None if the session stopped being wanted meanwhile."""
        while self.wanted.is_set():
            try:
                renewed = await self.leases.hold(self.lease_name)
            except Exception as error:
                log.warning("lease not readable: %s", error)
                renewed = None
            if renewed is not None:
                return renewed
            await first_of(asyncio.sleep(self.leases.retry_after(self.lease_name)), self.unwanted.wait())
        return None

    async def _keep_lease(self) -> None:
        interval = max(1.0, self.leases.duration / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                result = await self.leases.hold(self.lease_name)
            except Exception as error:
                log.warning("lease renewal failed: %s", error)
                result = None
            if result is not None:
                self.renewed = result
                await self.report()  # a write that failed, or someone else's, is put right at each renewal
            elif not self.holds_lease():
                log.warning("lease lost; disconnecting")
                self.renewed = None
                self.lease_lost.set()
                return

    async def _connect_once(self) -> float:
        """One connection attempt; returns the delay before the next one."""
        transport = self.transport_factory(self.identity)
        self.transport = transport
        await self._apply(Connecting(transport.stored_jid()))
        try:
            await transport.start()
            while True:
                event = await first_of(
                    transport.events.get(), self.unwanted.wait(), self.lease_lost.wait(), self.repair_wanted.wait()
                )
                if event is None:
                    return 0.0
                delay = await self._apply(event)
                if delay is not None:
                    return delay
        finally:
            self.transport = None
            await transport.stop()

    async def _apply(self, event: Event) -> float | None:
        """Step the state machine, carry out its actions, report; a delay when the connection ended."""
        before = self.view
        now = self.clock()
        self.view, actions = step(before, event, now)
        name = self.identity.name
        if isinstance(event, IncomingMessage):
            metrics.MESSAGES_RECEIVED.labels(self.identity.namespace).inc()
            self.emit(events.message_received(name, event))
        elif isinstance(event, OutgoingMessage):
            self.emit(events.message_sent(name, event.id, event.to, event.text, event.at))
        elif isinstance(event, MessageAck):
            self.emit(events.message_acked(name, event))
        if self.view.state != before.state:
            log.info("%s%s", self.view.state.value, _detail(self.view))
            view = self.view
            self.emit(events.status_changed(name, view.state.value, view.jid, view.last_error, now))
        if self.view.state == RuntimeState.CONNECTED:
            self.backoff.reset()
        delay = None
        for action in actions:
            if isinstance(action, Notify):
                self._notify(action.event, action.data)
                if action.event == "qr":
                    self.emit(events.qr_offered(name, action.data, now))
                elif action.event == "paired":
                    self.emit(events.paired(name, str(action.data["jid"]), now))
            else:
                delay = max(action.minimum, self.backoff.next())
        await self.report()
        view = self.view
        self._notify("status", {"state": view.state.value, "jid": view.jid, "lastError": view.last_error})
        return delay

    async def _repair(self) -> None:
        request, self.pending_repair = self.pending_repair, None
        self.repair_wanted.clear()
        if request is None or self.repairer is None:
            return
        self.repairing = request.id
        try:
            await self._carry_out(request, self.repairer)
        finally:
            self.repairing = None

    async def _carry_out(self, request: RepairRequest, repairer: Repairer) -> None:
        await self._apply(Stopped())  # the socket is closed: its identity must not read as a live one without a JID
        log.info("repair %s (%s): backing up and resetting the credential store", request.id, request.reason)
        report = await asyncio.to_thread(repairer, self.identity, request)
        if report.error:
            log.warning("repair %s not done: %s", request.id, report.error)
        await self._apply(Repaired(report, reset=request.backup is None and report.error is None))

    async def touch(self) -> None:
        """A message went out: activity, reported at coarse granularity."""
        await self._apply(Activity())

    async def report(self) -> None:
        """Write status.runtime (the reporter skips what the server holds already), only as the lease holder."""
        async with self._reporting:  # the fence is checked again by a write that waited for the one before
            if self.holds_lease():
                await self.report_to(self.identity.name, runtime_status(self.view))

    def _notify(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener.put_nowait((event, data))


def _detail(view: SessionView) -> str:
    if view.state == RuntimeState.CONNECTED:
        return f" as {view.jid}"
    return f" ({view.last_error})" if view.last_error and view.state != RuntimeState.STOPPED else ""
