"""The transport to waso's WhatsApp simulator (``waso simulator``): a WebSocket per session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

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
    TransportError,
)

CREDENTIALS_FILE = "simulator-credentials.json"
REQUEST_TIMEOUT = 10.0


class SimulatorTransport(Transport):
    def __init__(self, session: SessionIdentity, base_url: str, http: aiohttp.ClientSession) -> None:
        super().__init__(session)
        self.url = base_url.rstrip("/") + "/v1/socket"
        self.http = http
        self.store = session.store_dir / CREDENTIALS_FILE
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._refs = 0

    def _credentials(self) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(self.store.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return loaded

    def stored_jid(self) -> str | None:
        credentials = self._credentials()
        return str(credentials["jid"]) if credentials and "jid" in credentials else None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"simulator:{self.session.name}")

    async def _run(self) -> None:
        ending: Any = Disconnected("connection closed by the server")
        try:
            async with self.http.ws_connect(self.url, heartbeat=30, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                self._ws = ws
                await ws.send_json(
                    {"type": "hello", "phone": self.session.phone_number, "credentials": self._credentials()}
                )
                async for frame in ws:
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        break
                    result = self._handle(json.loads(frame.data))
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
            self.events.put_nowait(IncomingMessage(frame.get("from", ""), frame.get("text", "")))
        elif kind in ("pair_code", "ack"):
            future = self._pending.pop(str(frame.get("ref", kind)), None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif kind == "logged_out":
            self.store.unlink(missing_ok=True)  # as whatsmeow deletes the device on a 401
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
        answer = await self._request({"type": "send", "ref": ref, "to": to, "text": text}, ref)
        return str(answer["id"])

    async def request_pair_code(self) -> str:
        answer = await self._request({"type": "pair_code_request"}, "pair_code")
        code = str(answer["code"])
        return f"{code[:4]}-{code[4:]}"

    async def unlink(self) -> None:
        credentials = self._credentials()
        if credentials is None:
            return
        try:
            async with self.http.ws_connect(self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                await ws.send_json({"type": "hello", "phone": self.session.phone_number, "credentials": credentials})
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    async for frame in ws:
                        kind = json.loads(frame.data).get("type") if frame.type == aiohttp.WSMsgType.TEXT else None
                        if kind == "connected":
                            await ws.send_json({"type": "logout"})
                        elif kind == "logged_out":
                            break
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise TransportError(f"cannot unlink the device: {error or type(error).__name__}") from error

    async def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
            self._task = None
