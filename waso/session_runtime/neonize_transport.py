"""The transport to the real WhatsApp, through neonize (the Python binding of whatsmeow).

Facts this module relies on (neonize 0.5.x): ``NewAClient(name, uuid=...)`` takes the
store as ``name`` (a SQLite path; a relative one would land in the working directory,
so the path is always absolute) and needs a ``uuid`` unique per session; ``connect()``
runs whatsmeow in a default-executor thread for as long as the session is live (the
runtime sizes that executor); events arrive as protobuf messages from a Go thread.
The device identity lives in the ``jid`` column of ``whatsmeow_device``; reading it
read-only tells whom a store holds without connecting. whatsmeow deletes the device
itself on a 401 logout and does not reconnect after StreamReplaced.

A session without credentials pairs in a child process (``neonize_pairing``): whatsmeow's
QR loop outlives its timeout and no call frees the thread running it, so pairing in this
process would leak a thread per abandoned attempt. The child pairs into a temporary
store, exits, and is reaped; then the store is renamed into place and the session
connects here from its credentials. ``stop()`` during pairing kills the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from waso.session_runtime.neonize_pairing import (
    KILL_GRACE,
    PAIR_CODE_TIMEOUT,
    PairingWorker,
    default_command,
    finalize_store,
    remove_store,
)
from waso.session_runtime.transport import (
    AckStatus,
    Connected,
    Disconnected,
    IncomingMessage,
    LoggedOut,
    MessageAck,
    OutgoingMessage,
    Paired,
    QrCode,
    SessionIdentity,
    StreamReplaced,
    TemporaryBan,
    Transport,
    TransportError,
    TransportEvent,
)

log = logging.getLogger("waso.runtime")
STORE_FILE = "whatsmeow.db"
QR_LIFETIME = timedelta(seconds=20)
PAIRING_DEADLINE = timedelta(seconds=150)
WORKER_DEADLINE = PAIRING_DEADLINE + timedelta(seconds=30)
"""The pairing child ends itself then, should its parent not have ended it."""


def stored_jid(store: Any) -> str | None:
    """The JID in a whatsmeow SQLite store, read-only; None when the file or the device row is absent."""
    if not store.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=2)) as db:
            row = db.execute("SELECT jid FROM whatsmeow_device LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def jid_text(jid: Any) -> str:
    """Format a neonize JID message as user[:device]@server."""
    device = f":{jid.Device}" if jid.Device else ""
    return f"{jid.User}{device}@{jid.Server or 's.whatsapp.net'}"


def map_event(event: Any, now: datetime) -> TransportEvent | None:
    """A neonize event message as a transport event (None: not something the supervisor follows)."""
    from neonize.aioze.events import (
        DisconnectedEv,
        LoggedOutEv,
        MessageEv,
        PairStatusEv,
        ReceiptEv,
        StreamReplacedEv,
        TemporaryBanEv,
    )

    if isinstance(event, PairStatusEv):
        if event.Error:
            return Disconnected(f"pairing failed: {event.Error}")
        return Paired(jid_text(event.ID))
    if isinstance(event, LoggedOutEv):
        from neonize.proto.Neonize_pb2 import ConnectFailureReason

        reason = ConnectFailureReason.Name(event.Reason) if event.Reason else "LOGGED_OUT"
        return LoggedOut(f"{reason}{' on connect' if event.OnConnect else ''}")
    if isinstance(event, StreamReplacedEv):
        return StreamReplaced()
    if isinstance(event, TemporaryBanEv):
        until = now + timedelta(seconds=event.Expire) if event.Expire else None
        return TemporaryBan(until, f"temporary ban (code {event.Code})")
    if isinstance(event, DisconnectedEv):
        return Disconnected("disconnected by WhatsApp")
    if isinstance(event, MessageEv):
        info = event.Info
        text = event.Message.conversation or event.Message.extendedTextMessage.text
        at = datetime.fromtimestamp(info.Timestamp, UTC) if info.Timestamp else now
        source = info.MessageSource
        return IncomingMessage(jid_text(source.Sender), text, info.ID, jid_text(source.Chat), at)
    if isinstance(event, ReceiptEv):
        from neonize.proto.Neonize_pb2 import Receipt

        status = RECEIPT_STATUS.get(Receipt.ReceiptType.Name(event.Type))
        if status is None or not event.MessageIDs:
            return None  # a retry or a receipt of another device of the account: nothing to report
        at = datetime.fromtimestamp(event.Timestamp, UTC) if event.Timestamp else now
        return MessageAck(tuple(event.MessageIDs), jid_text(event.MessageSource.Chat), status, at)
    return None


RECEIPT_STATUS = {"DELIVERED": AckStatus.DELIVERED, "READ": AckStatus.READ}
"""neonize's receipt types that say something about a sent message's progress; the others (SENDER, RETRY,
READ_SELF, PLAYED, ...) concern other devices or the protocol."""


class NeonizeTransport(Transport):
    def __init__(
        self,
        session: SessionIdentity,
        pairing_command: Sequence[str] | None = None,
        pairing_slots: asyncio.Semaphore | None = None,
    ) -> None:
        super().__init__(session)
        self.pairing_slots = pairing_slots
        """Shared by the pod's transports: pairing children at once (None: no limit)."""
        self._holds_slot = False
        self.store = (session.store_dir / STORE_FILE).absolute()
        self.pairing_store = self.store.with_name(STORE_FILE + ".pairing")
        self.pairing_command = list(pairing_command) if pairing_command is not None else default_command()
        self.pairing_worker: PairingWorker | None = None
        """The child of this attempt's pairing (kept after it ended, for inspection)."""
        self.client: Any = None
        self._connect_task: asyncio.Future[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._pairing_deadline: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._worker_settled = False

    def stored_jid(self) -> str | None:
        return stored_jid(self.store)

    def _new_client(self) -> Any:
        from neonize.aioze.client import NewAClient
        from neonize.proto.waCompanionReg.WAWebProtobufsCompanionReg_pb2 import DeviceProps

        self.store.parent.mkdir(parents=True, exist_ok=True)
        props = DeviceProps(os=self.session.device_name, platformType=DeviceProps.DESKTOP)
        return NewAClient(str(self.store), props=props, uuid=f"{self.session.namespace}/{self.session.name}")

    async def start(self) -> None:
        if self.stored_jid() is None:
            await self._start_pairing()
        else:
            await self._connect_stored()

    # -- pairing, in a child process -----------------------------------------------------------

    async def _start_pairing(self) -> None:
        self._worker_settled = False
        self._follower = asyncio.create_task(self._pair(), name=f"pairing:{self.session.name}")

    async def _pair(self) -> None:
        """Wait for a pairing slot, then pair in a child; stop() cancels the wait or ends the child."""
        if self.pairing_slots is not None:
            await self.pairing_slots.acquire()
            self._holds_slot = True
        self.store.parent.mkdir(parents=True, exist_ok=True)
        remove_store(self.pairing_store)  # left by a runtime that died while pairing; no child holds it
        try:
            worker = await PairingWorker.spawn(
                self.pairing_command,
                self.pairing_store,
                phone=self.session.phone_number,
                device_name=self.session.device_name,
                uuid=f"{self.session.namespace}/{self.session.name}",
                deadline=WORKER_DEADLINE.total_seconds(),
            )
        except OSError as error:
            self._release_slot()
            self.events.put_nowait(Disconnected(f"cannot start the pairing worker: {error}"))
            return
        self.pairing_worker = worker
        await self._follow_pairing(worker)

    def _release_slot(self) -> None:
        if self._holds_slot and self.pairing_slots is not None:
            self._holds_slot = False
            self.pairing_slots.release()

    def _on_worker_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "qr":
            self.events.put_nowait(QrCode(str(event["code"]), datetime.now(UTC) + QR_LIFETIME))
            if self._pairing_deadline is None:
                self._pairing_deadline = asyncio.create_task(self._expire_pairing())
        elif kind == "paired":
            self.events.put_nowait(Paired(str(event["jid"])))

    async def _follow_pairing(self, worker: PairingWorker) -> None:
        try:
            code = await worker.follow(self._on_worker_event)
        except Exception as error:  # an unreadable child: the attempt ends, stop() kills it
            log.warning("pairing worker %d: %r", worker.pid, error)
            self.events.put_nowait(Disconnected(f"pairing worker failed: {error}"))
            return
        self._release_slot()  # the child has exited
        if self._settle_pairing(worker) is not None:
            await self._connect_stored()
        elif worker.paired_jid is not None:
            self.events.put_nowait(Disconnected("paired, but the pairing worker left no usable store"))
        else:
            self.events.put_nowait(Disconnected(worker.error or f"the pairing worker exited with status {code}"))

    def _settle_pairing(self, worker: PairingWorker) -> str | None:
        """Once the child is reaped: its store into place if it paired, else away; returns the stored JID."""
        if self._worker_settled:
            return None
        self._worker_settled = True
        jid = finalize_store(self.pairing_store, self.store) if worker.paired_jid is not None else None
        if jid is None:
            remove_store(self.pairing_store)
        else:
            log.info("paired as %s; credentials stored", jid)
        return jid

    async def _end_pairing(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            try:
                await follower
            except asyncio.CancelledError:
                pass
            except Exception as error:
                log.warning("pairing ended with %r", error)
        worker = self.pairing_worker
        if worker is not None and not self._worker_settled:
            status = await worker.end(KILL_GRACE)
            log.info("pairing worker %d ended (status %d)", worker.pid, status)
            self._settle_pairing(worker)
        self._release_slot()  # only once no child of this attempt runs

    # -- connected, in this process ------------------------------------------------------------

    async def _connect_stored(self) -> None:
        import neonize.aioze.events as neonize_events
        from neonize.aioze.events import (
            ConnectedEv,
            DisconnectedEv,
            LoggedOutEv,
            MessageEv,
            PairStatusEv,
            ReceiptEv,
            StreamReplacedEv,
            TemporaryBanEv,
        )

        # neonize keeps the loop that receives events in a process global, set only once.
        neonize_events.event_global_loop = asyncio.get_running_loop()
        client = self._new_client()
        self.client = client

        async def on_qr(_: Any, __: bytes) -> None:
            # Pairing here would start whatsmeow's QR loop in this process; the next attempt pairs in a child.
            self.events.put_nowait(Disconnected("the stored credentials were not accepted: WhatsApp asks for pairing"))

        async def on_connected(_: Any, __: Any) -> None:
            me = client.me
            jid = jid_text(me.JID) if me is not None and me.JID.User else (self.stored_jid() or "")
            push_name = me.PushName if me is not None else None
            self.events.put_nowait(Connected(jid, push_name or None))

        async def forward(_: Any, event: Any) -> None:
            mapped = map_event(event, datetime.now(UTC))
            if mapped is not None:
                self.events.put_nowait(mapped)

        client.qr(on_qr)
        client.event(ConnectedEv)(on_connected)
        for kind in (PairStatusEv, LoggedOutEv, StreamReplacedEv, TemporaryBanEv, DisconnectedEv, MessageEv, ReceiptEv):
            client.event(kind)(forward)
        try:
            self._connect_task = await client.connect()
        except Exception as error:  # the Go side refused to start
            self.events.put_nowait(Disconnected(f"connect failed: {error}"))
            return
        self._watcher = asyncio.create_task(self._watch_connect())

    async def _expire_pairing(self) -> None:
        """whatsmeow gives up on unscanned QR codes without telling Python; end the attempt ourselves."""
        await asyncio.sleep(PAIRING_DEADLINE.total_seconds())
        if self.stored_jid() is None and (self.pairing_worker is None or self.pairing_worker.paired_jid is None):
            self.events.put_nowait(Disconnected("pairing timed out: no QR scan or pairing code entered"))

    async def _watch_connect(self) -> None:
        """whatsmeow's connect call returns only when the session ends; its error is the reason."""
        assert self._connect_task is not None
        try:
            # Shielded: cancelling neonize's connect task runs a blocking Go call on the event loop.
            await asyncio.shield(self._connect_task)
            self.events.put_nowait(Disconnected("connection ended"))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.events.put_nowait(Disconnected(str(error) or type(error).__name__))

    async def send_text(self, to: str, text: str) -> str:
        if self.client is None:
            raise TransportError("not connected")
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message
        from neonize.utils.jid import build_jid

        try:
            response = await self.client.send_message(build_jid(to.removeprefix("+")), Message(conversation=text))
        except Exception as error:
            raise TransportError(str(error)) from error
        # Receipts come from the recipient's phone, well after the server's answer that ends send_message.
        self.events.put_nowait(OutgoingMessage(str(response.ID), to, text, datetime.now(UTC)))
        return str(response.ID)

    async def request_pair_code(self) -> str:
        worker = self.pairing_worker
        if worker is not None and worker.returncode is None:
            try:
                async with asyncio.timeout(PAIR_CODE_TIMEOUT):
                    return await worker.request_pair_code()
            except TimeoutError:
                raise TransportError(f"no pairing code within {PAIR_CODE_TIMEOUT:.0f} s") from None
            except RuntimeError as error:
                raise TransportError(str(error)) from error
        if self.client is None:
            raise TransportError("not connected")
        try:
            code: str = await self.client.PairPhone(self.session.phone_number.removeprefix("+"), True)
        except Exception as error:
            raise TransportError(str(error)) from error
        return code

    async def unlink(self) -> None:
        if self.stored_jid() is None:
            return
        await self.start()
        try:
            async with asyncio.timeout(30):
                while not isinstance(event := await self.events.get(), Connected):
                    if isinstance(event, (Disconnected, LoggedOut, StreamReplaced, TemporaryBan)):
                        raise TransportError(f"cannot unlink the device: {getattr(event, 'error', event)}")
            await self.client.logout()
        except TimeoutError:
            raise TransportError("cannot unlink the device: no connection within 30 s") from None
        except TransportError:
            raise
        except Exception as error:
            raise TransportError(f"cannot unlink the device: {error}") from error
        finally:
            await self.stop()

    async def stop(self) -> None:
        await self._end_pairing()
        client, self.client = self.client, None
        for task in (self._watcher, self._pairing_deadline):
            if task is not None and not task.done():
                task.cancel()
        if client is not None:
            try:
                await asyncio.wait_for(client.stop(), 15)  # whatsmeow Disconnect + end of the Go session
            except Exception as error:
                log.warning("neonize stop failed: %s", error)
        if self._connect_task is not None and not self._connect_task.done():
            # Never cancel it (see _watch_connect); a dial in progress ends by its own timeout.
            done, _ = await asyncio.wait({self._connect_task}, timeout=15)
            if not done:
                log.warning("neonize session thread did not end; abandoning it")
        self._watcher = self._connect_task = self._pairing_deadline = None
