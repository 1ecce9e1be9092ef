"""The WhatsApp sandbox: plays WhatsApp's servers and the phone for waso's simulator transport.

A runtime connects one WebSocket per session to ``/v1/socket``. The first frame says
who it is: ``{"type": "hello", "phone": "+49...", "credentials": null | {...}}``.
Without credentials the simulator offers rotating QR codes (or a pairing code on
request) until the phone side links the device; with credentials it logs the device
in. The phone side and fault injection are plain HTTP calls, which is how tests and
``make demo`` drive it.

Like the real service it assigns device numbers per account, growing with every new
link (so above 10 too), replaces an older socket of the same device with
``stream_replaced``, forgets a logged-out device, and refuses a banned account until
the ban expires. It counts live sockets per device, so a test can prove that no
credential is ever live on two sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger("waso.simulator")

FAULTS = ("drop", "logout", "stream_replaced", "ban", "identity_mismatch")
_PAIR_ALPHABET = "ABCDEFGHJKLMNPQRSTVWXYZ23456789"


@dataclass
class Device:
    device_id: int
    token: str

    def jid(self, phone: str) -> str:
        return f"{phone.removeprefix('+')}:{self.device_id}@s.whatsapp.net"


@dataclass
class Account:
    phone: str
    push_name: str
    devices: dict[int, Device] = field(default_factory=dict)
    next_device: int = 1
    banned_until: float = 0.0
    mismatch_next_login: bool = False

    def link(self) -> Device:
        device = Device(self.next_device, secrets.token_hex(16))
        self.devices[device.device_id] = device
        self.next_device += 1
        return device


@dataclass(eq=False)  # identity semantics: sockets live in a set
class Socket:
    ws: web.WebSocketResponse
    phone: str
    device: Device | None = None
    qr_codes: list[str] = field(default_factory=list)
    pair_code: str | None = None
    paired: asyncio.Event = field(default_factory=asyncio.Event)


class Simulator:
    def __init__(self, *, qr_interval: float = 20.0, auto_pair: float | None = None, first_device: int = 1) -> None:
        self.qr_interval = qr_interval
        self.auto_pair = auto_pair
        self.first_device = first_device
        self.accounts: dict[str, Account] = {}
        self.sockets: set[Socket] = set()
        self.live: dict[str, int] = defaultdict(int)  # device JID -> live sockets
        self.max_live: dict[str, int] = defaultdict(int)
        self.counters: dict[str, int] = defaultdict(int)
        self.sent: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def account(self, phone: str) -> Account:
        if phone not in self.accounts:
            self.accounts[phone] = Account(phone, f"User {phone[-4:]}", next_device=self.first_device)
        return self.accounts[phone]

    # -- the runtime's side ---------------------------------------------------------------

    async def socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        hello = await ws.receive_json(timeout=10)
        if hello.get("type") != "hello" or not isinstance(hello.get("phone"), str):
            await ws.close(code=4400, message=b"first frame must be hello with a phone")
            return ws
        conn = Socket(ws, hello["phone"])
        self.counters["connections"] += 1
        account = self.account(conn.phone)
        if account.banned_until > time.time():
            await ws.send_json({"type": "banned", "until": account.banned_until})
            await ws.close()
            return ws
        self.sockets.add(conn)
        try:
            credentials = hello.get("credentials")
            pairing: asyncio.Task[None] | None = None
            if credentials:
                if not await self._login(conn, account, credentials):
                    return ws
            else:
                pairing = asyncio.create_task(self._pair(conn, account))
            try:
                await self._serve(conn, account)
            finally:
                if pairing is not None:
                    pairing.cancel()
        finally:
            self._forget(conn)
        return ws

    async def _login(self, conn: Socket, account: Account, credentials: dict[str, Any]) -> bool:
        device = account.devices.get(int(credentials.get("device", -1)))
        if device is None or device.token != credentials.get("token"):
            self.counters["logins_refused"] += 1
            await conn.ws.send_json({"type": "logged_out", "reason": 401, "message": "device is not linked"})
            await conn.ws.close()
            return False
        await self._go_live(conn, account, device)
        return True

    async def _go_live(self, conn: Socket, account: Account, device: Device) -> None:
        jid = device.jid(account.phone)
        for other in [s for s in self.sockets if s is not conn and s.device is device]:
            # WhatsApp keeps the newest socket of a device and tells the older one.
            self.counters["stream_replaced"] += 1
            with contextlib.suppress(ConnectionError, RuntimeError):
                await other.ws.send_json({"type": "stream_replaced"})
                await other.ws.close()
        conn.device = device
        self.live[jid] += 1
        self.max_live[jid] = max(self.max_live[jid], self.live[jid])
        reported = jid
        if account.mismatch_next_login:
            account.mismatch_next_login = False
            reported = f"{account.phone.removeprefix('+')}:{device.device_id + 1}@s.whatsapp.net"
        self.counters["logins"] += 1
        await conn.ws.send_json({"type": "connected", "jid": reported, "pushName": account.push_name})

    def _forget(self, conn: Socket) -> None:
        self.sockets.discard(conn)
        if conn.device is not None:
            jid = conn.device.jid(conn.phone)
            self.live[jid] -= 1
            conn.device = None

    async def _pair(self, conn: Socket, account: Account) -> None:
        """Offer QR codes (rotating) until the phone links the device; scan them in auto-pair mode."""
        while conn.device is None:
            code = f"2@{secrets.token_urlsafe(24)},{account.phone},{next(self._ids)}"
            conn.qr_codes.append(code)
            self.counters["qr_codes"] += 1
            await conn.ws.send_json({"type": "qr", "code": code, "expiresIn": self.qr_interval})
            if self.auto_pair is not None:
                await asyncio.sleep(self.auto_pair)
                await self.link(conn, account)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.paired.wait(), timeout=self.qr_interval)

    async def link(self, conn: Socket, account: Account) -> Device:
        device = account.link()
        self.counters["links"] += 1
        conn.paired.set()
        await conn.ws.send_json(
            {
                "type": "paired",
                "jid": device.jid(account.phone),
                "credentials": {"device": device.device_id, "token": device.token},
            }
        )
        await self._go_live(conn, account, device)
        return device

    async def _serve(self, conn: Socket, account: Account) -> None:
        async for frame in conn.ws:
            if frame.type != WSMsgType.TEXT:
                break
            message = frame.json()
            kind = message.get("type")
            if kind == "pair_code_request" and conn.device is None:
                conn.pair_code = "".join(secrets.choice(_PAIR_ALPHABET) for _ in range(8))
                await conn.ws.send_json({"type": "pair_code", "code": conn.pair_code})
            elif kind == "logout" and conn.device is not None:
                # The companion logs itself out: WhatsApp forgets the device.
                account.devices.pop(conn.device.device_id, None)
                self.counters["unlinked"] += 1
                await conn.ws.send_json({"type": "logged_out", "reason": 401, "message": "logged out by the companion"})
                await conn.ws.close()
                break
            elif kind == "send" and conn.device is not None:
                record = {
                    "id": next(self._ids),
                    "from": account.phone,
                    "jid": conn.device.jid(account.phone),
                    "to": message.get("to"),
                    "text": message.get("text"),
                    "at": time.time(),
                }
                self.sent.append(record)
                await conn.ws.send_json({"type": "ack", "ref": message.get("ref"), "id": record["id"]})

    # -- the phone's side and the operator of the sandbox ---------------------------------

    def _pairing_socket(self, phone: str) -> Socket | None:
        return next((s for s in self.sockets if s.phone == phone and s.device is None), None)

    async def scan(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        conn = self._pairing_socket(phone)
        if conn is None:
            raise web.HTTPConflict(text=f"no device of {phone} is waiting for a QR scan")
        code = body.get("code")
        if code is not None and (not conn.qr_codes or conn.qr_codes[-1] != code):
            raise web.HTTPUnprocessableEntity(text="that QR code is not the current one (expired or unknown)")
        device = await self.link(conn, self.account(phone))
        return web.json_response({"jid": device.jid(phone), "deviceId": device.device_id})

    async def confirm_pair_code(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        conn = next(
            (s for s in self.sockets if s.phone == phone and s.pair_code is not None and s.device is None), None
        )
        if conn is None:
            raise web.HTTPConflict(text=f"no device of {phone} has requested a pairing code")
        if str(body.get("code", "")).replace("-", "").upper() != conn.pair_code:
            raise web.HTTPUnprocessableEntity(text="wrong pairing code")
        device = await self.link(conn, self.account(phone))
        return web.json_response({"jid": device.jid(phone), "deviceId": device.device_id})

    async def inbound(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        targets = [s for s in self.sockets if s.phone == phone and s.device is not None]
        for conn in targets:
            await conn.ws.send_json(
                {"type": "message", "from": body.get("from", "+10000000000"), "text": body.get("text", "")}
            )
        return web.json_response({"delivered": len(targets)})

    async def fault(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        kind = body.get("kind")
        if kind not in FAULTS:
            raise web.HTTPBadRequest(text=f"kind must be one of {', '.join(FAULTS)}")
        account = self.account(phone)
        live = [s for s in self.sockets if s.phone == phone and s.device is not None]
        self.counters[f"fault_{kind}"] += 1
        if kind == "identity_mismatch":
            account.mismatch_next_login = True
        if kind == "ban":
            seconds = body.get("seconds", 60)
            if not isinstance(seconds, int | float) or seconds <= 0:
                raise web.HTTPBadRequest(text="seconds must be a positive number")
            account.banned_until = time.time() + seconds
        if kind == "logout":
            for conn in live:
                if conn.device is not None:
                    account.devices.pop(conn.device.device_id, None)
        for conn in live:
            frame = {
                "drop": None,
                "logout": {"type": "logged_out", "reason": 401, "message": "logged out from the phone"},
                "stream_replaced": {"type": "stream_replaced"},
                "ban": {"type": "banned", "until": account.banned_until},
                "identity_mismatch": None,
            }[kind]
            with contextlib.suppress(ConnectionError, RuntimeError):
                if frame is not None:
                    await conn.ws.send_json(frame)
                if kind != "identity_mismatch":
                    await conn.ws.close()
        return web.json_response({"kind": kind, "affected": len(live)})

    async def messages(self, request: web.Request) -> web.Response:
        phone = request.query.get("from")
        return web.json_response([m for m in self.sent if phone is None or m["from"] == phone])

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "live": {jid: n for jid, n in self.live.items() if n},
                "maxLive": dict(self.max_live),
                "counters": dict(self.counters),
                "accounts": {
                    phone: {"devices": sorted(a.devices), "nextDevice": a.next_device}
                    for phone, a in self.accounts.items()
                },
                "pairing": sorted({s.phone for s in self.sockets if s.device is None}),
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/v1/socket", self.socket),
                web.post("/v1/phones/{phone}/scan", self.scan),
                web.post("/v1/phones/{phone}/pair-code", self.confirm_pair_code),
                web.post("/v1/phones/{phone}/inbound", self.inbound),
                web.post("/v1/phones/{phone}/faults", self.fault),
                web.get("/v1/messages", self.messages),
                web.get("/v1/stats", self.stats),
                web.get("/healthz", self.healthz),
            ]
        )
        return app


async def _json(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def run(host: str, port: int, *, qr_interval: float, auto_pair: float | None, first_device: int) -> None:
    simulator = Simulator(qr_interval=qr_interval, auto_pair=auto_pair, first_device=first_device)
    web.run_app(simulator.app(), host=host, port=port, print=lambda _: log.info("simulator on %s:%d", host, port))
