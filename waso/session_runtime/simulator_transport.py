"""The transport to waso's WhatsApp simulator (``waso simulator``): a WebSocket per session.

A device the simulator linked keeps the token it was given in ``simulator-credentials.json``.
Without that file, a store written by ``waso legacy import`` (``whatsmeow.db`` with one
``whatsmeow_device`` row) logs in by keys: the hello names the device number and the public
noise key (derived from the stored private one), and the answer to the simulator's challenge
proves possession of the private key (HMAC-SHA256 keyed with X25519(noise private, ephemeral
public) over the ephemeral key and the JID; see ``waso.simulator.server``). A refused key login
deletes the device row, as whatsmeow deletes its device on a 401, so the session pairs again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from waso.api.jid import parse_jid
from waso.session_runtime.neonize_transport import STORE_FILE
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
)

CREDENTIALS_FILE = "simulator-credentials.json"
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class DeviceKeys:
    """The identity of an imported whatsmeow store: its JID, device number and private noise key."""

    jid: str
    device: int
    noise_key: bytes

    def hello(self) -> dict[str, Any]:
        """The credentials of a login by keys: the device number and the public noise key."""
        public = X25519PrivateKey.from_private_bytes(self.noise_key).public_key()
        return {"device": self.device, "noiseKey": _b64(public.public_bytes(Encoding.Raw, PublicFormat.Raw))}

    def proof(self, challenge: dict[str, Any]) -> dict[str, Any]:
        """The answer to the simulator's challenge: a MAC only the holder of the private noise key can make."""
        ephemeral = base64.b64decode(str(challenge.get("ephemeral", "")), validate=True)
        shared = X25519PrivateKey.from_private_bytes(self.noise_key).exchange(
            X25519PublicKey.from_public_bytes(ephemeral)
        )
        mac = hmac.new(shared, ephemeral + self.jid.encode(), hashlib.sha256).digest()
        return {"type": "proof", "mac": _b64(mac)}


def read_device_keys(store: Path) -> DeviceKeys | None:
    """The device of a whatsmeow store, read-only; None unless it holds exactly one usable device row."""
    if not store.is_file():
        return None
    try:
        uri = store.absolute().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=2)) as db:
            rows = db.execute("SELECT jid, noise_key FROM whatsmeow_device").fetchall()
    except sqlite3.Error:
        return None
    if len(rows) != 1:
        return None
    jid, noise_key = rows[0]
    parsed = parse_jid(jid) if isinstance(jid, str) else None
    if parsed is None or parsed.device == 0 or not isinstance(noise_key, bytes) or len(noise_key) != 32:
        return None
    return DeviceKeys(jid, parsed.device, noise_key)


def forget_device(store: Path, jid: str) -> None:
    """Delete the device row of ``jid`` from a whatsmeow store (whatsmeow's ``Device.Delete`` on a 401)."""
    try:
        uri = store.absolute().as_uri() + "?mode=rw"  # never creates a store
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db, db:
            db.execute("DELETE FROM whatsmeow_device WHERE jid = ?", (jid,))
    except sqlite3.Error:
        pass  # the next login is refused again and tries once more


class SimulatorTransport(Transport):
    def __init__(self, session: SessionIdentity, base_url: str, http: aiohttp.ClientSession) -> None:
        super().__init__(session)
        self.url = base_url.rstrip("/") + "/v1/socket"
        self.http = http
        self.store = session.store_dir / CREDENTIALS_FILE
        self.key_store = session.store_dir / STORE_FILE
        """An imported whatsmeow store: logged in by keys while there is no credentials file."""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._refs = 0
        self._sending: dict[str, tuple[str, str]] = {}
        """Messages sent and not yet acknowledged, by ref: (to, text)."""
        self._keys: DeviceKeys | None = None
        """The device of this connection when it logs in by keys."""

    def _credentials(self) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(self.store.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return loaded

    def stored_jid(self) -> str | None:
        credentials = self._credentials()
        if credentials is not None:
            return str(credentials["jid"]) if "jid" in credentials else None
        keys = read_device_keys(self.key_store)
        return keys.jid if keys is not None else None

    def _hello(self) -> tuple[dict[str, Any], DeviceKeys | None]:
        """The hello frame (stored credentials, else an imported store's keys, else none: pairing) and the keys."""
        credentials = self._credentials()
        keys = read_device_keys(self.key_store) if credentials is None else None
        if keys is not None:
            credentials = keys.hello()
        return {"type": "hello", "phone": self.session.phone_number, "credentials": credentials}, keys

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"simulator:{self.session.name}")

    async def _run(self) -> None:
        ending: Any = Disconnected("connection closed by the server")
        try:
            async with self.http.ws_connect(self.url, heartbeat=30, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                self._ws = ws
                hello, self._keys = self._hello()
                await ws.send_json(hello)
                async for frame in ws:
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        break
                    message = json.loads(frame.data)
                    if message.get("type") == "challenge" and self._keys is not None:
                        try:
                            await ws.send_json(self._keys.proof(message))
                        except ValueError as error:  # not base64, not a 32-byte key, a low-order point
                            ending = Disconnected(f"the simulator's challenge is malformed: {error}")
                            break
                        continue
                    result = self._handle(message)
                    if result is not None:
                        ending = result
                        break
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            ending = Disconnected(f"cannot reach the simulator at {self.url}: {error or type(error).__name__}")
        finally:
            self._ws = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(TransportError("connection closed"))
            self._pending.clear()
        await self.events.put(ending)

    def _handle(self, frame: dict[str, Any]) -> Any:
        """Queue the event of a frame; return the ending event if the frame ends the connection."""
        kind = frame.get("type")
        if kind == "qr":
            expires = datetime.now(UTC) + timedelta(seconds=float(frame.get("expiresIn", 20)))
            self.events.put_nowait(QrCode(frame["code"], expires))
        elif kind == "paired":
            if self._credentials() is not None:
                return None  # one link per pairing: stored credentials are never replaced
            self._save({**frame["credentials"], "jid": frame["jid"]})
            self.events.put_nowait(Paired(frame["jid"]))
        elif kind == "connected":
            self.events.put_nowait(Connected(frame["jid"], frame.get("pushName")))
        elif kind == "message":
            sender = str(frame.get("from", ""))
            at = datetime.fromtimestamp(float(frame.get("at") or time.time()), UTC)
            chat = str(frame.get("chat") or sender)
            self.events.put_nowait(IncomingMessage(sender, str(frame.get("text", "")), str(frame["id"]), chat, at))
        elif kind == "receipt":
            status = AckStatus(frame.get("status", "delivered"))
            ids = tuple(str(i) for i in frame.get("ids", ()))
            self.events.put_nowait(MessageAck(ids, str(frame.get("chat", "")), status, datetime.now(UTC)))
        elif kind in ("pair_code", "ack"):
            ref = str(frame.get("ref", kind))
            future = self._pending.pop(ref, None)
            sending = self._sending.pop(ref, None)
            if sending is not None:  # here, so that it is queued before the receipt that follows this frame
                self.events.put_nowait(OutgoingMessage(str(frame["id"]), *sending, datetime.now(UTC)))
            if future is not None and not future.done():
                future.set_result(frame)
        elif kind == "logged_out":
            self.store.unlink(missing_ok=True)  # as whatsmeow deletes the device on a 401
            if self._keys is not None:
                forget_device(self.key_store, self._keys.jid)
            return LoggedOut(f"{frame.get('reason', 401)}: {frame.get('message', 'logged out')}")
        elif kind == "stream_replaced":
            return StreamReplaced()
        elif kind == "banned":
            until = frame.get("until")
            return TemporaryBan(datetime.fromtimestamp(until, UTC) if until else None, "temporarily banned")
        return None

    def _save(self, credentials: dict[str, Any]) -> None:
        self.session.store_dir.mkdir(parents=True, exist_ok=True)
        partial = self.store.with_suffix(".tmp")
        partial.write_text(json.dumps(credentials))
        os.replace(partial, self.store)

    async def _request(self, frame: dict[str, Any], ref: str) -> dict[str, Any]:
        if self._ws is None or self._ws.closed:
            raise TransportError("not connected")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        await self._ws.send_json(frame)
        try:
            return await asyncio.wait_for(future, REQUEST_TIMEOUT)
        except TimeoutError:
            raise TransportError("the simulator did not answer in time") from None
        finally:
            self._pending.pop(ref, None)

    async def send_text(self, to: str, text: str) -> str:
        self._refs += 1
        ref = f"m{self._refs}"
        self._sending[ref] = (to, text)
        try:
            answer = await self._request({"type": "send", "ref": ref, "to": to, "text": text}, ref)
        finally:
            self._sending.pop(ref, None)
        return str(answer["id"])

    async def request_pair_code(self) -> str:
        answer = await self._request({"type": "pair_code_request"}, "pair_code")
        code = str(answer["code"])
        return f"{code[:4]}-{code[4:]}"

    async def unlink(self) -> None:
        hello, keys = self._hello()
        if hello["credentials"] is None:
            return
        try:
            async with self.http.ws_connect(self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                await ws.send_json(hello)
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    async for frame in ws:
                        message = json.loads(frame.data) if frame.type == aiohttp.WSMsgType.TEXT else {}
                        kind = message.get("type")
                        if kind == "challenge" and keys is not None:
                            await ws.send_json(keys.proof(message))
                        elif kind == "connected":
                            await ws.send_json({"type": "logout"})
                        elif kind == "logged_out":
                            break
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
            raise TransportError(f"cannot unlink the device: {error or type(error).__name__}") from error

    async def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
            self._task = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
