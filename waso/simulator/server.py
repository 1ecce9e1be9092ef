"""The WhatsApp sandbox: plays WhatsApp's servers and the phone for waso's simulator transport.

A runtime connects one WebSocket per session to ``/v1/socket``. The first frame says
who it is: ``{"type": "hello", "phone": "+49...", "credentials": null | {...}}``.
Without credentials the simulator offers rotating QR codes (or a pairing code on
request) until the phone side links the device; with credentials it logs the device
in. The phone side and fault injection are plain HTTP calls, which is how tests and
``make demo`` drive it.

Credentials come in two kinds. A device the simulator linked itself presents the token it
was given then: ``{"device": n, "token": "..."}``. A device linked earlier by another client
(a Baileys session imported with ``waso legacy import``) is registered on the phone's side
with its public keys, as WhatsApp's servers know the noise and identity public keys of every
linked device (``POST /v1/phones/{phone}/devices``), and logs in by proving that it holds the
noise key's private half, a small model of the static-key step of WhatsApp's Noise handshake:
it says ``{"device": n, "noiseKey": "<base64 X25519 public key>"}``; if that is the key
registered for the device, the simulator sends ``{"type": "challenge", "ephemeral": "<base64
X25519 public key>"}`` of a fresh ephemeral key and the device answers ``{"type": "proof",
"mac": "<base64 HMAC-SHA256>"}`` keyed with X25519(noise private, ephemeral public) over the
ephemeral public key followed by the device's JID (``user:device@s.whatsapp.net``). An
unknown device, another noise key, a wrong proof or none within ``PROOF_TIMEOUT`` seconds are
refused like a forgotten token: ``logged_out`` 401, with a message saying which.

Like the real service it assigns device numbers per account, growing with every new
link (so above 10 too), replaces an older socket of the same device with
``stream_replaced``, forgets a logged-out device, and refuses a banned account until
the ban expires (the ``banned`` frame carries the expiry as ``until``, in epoch
seconds). It counts live sockets per device, so a test can prove that no credential is
ever live on two sockets, and remembers per account which devices are linked and which
were unlinked (``GET /v1/phones/{phone}/devices``).

A pairing socket is linked at most once: whichever of auto-pair, a QR scan or a pairing
code comes first claims it (synchronously, before any await) and the others are no-ops
(a scan or pairing code then answers 409).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import logging
import math
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

log = logging.getLogger("waso.simulator")

FAULTS = ("drop", "logout", "stream_replaced", "ban", "identity_mismatch")
MAX_BAN_SECONDS = 30 * 24 * 3600
_PAIR_ALPHABET = "ABCDEFGHJKLMNPQRSTVWXYZ23456789"
PROOF_TIMEOUT = 10.0
"""Seconds a device logging in by keys has to answer the challenge."""
MAX_DEVICE = 2**16 - 1
"""whatsmeow keeps a JID's device number in 16 bits."""


@dataclass
class Device:
    device_id: int
    token: str | None
    """What a device linked here presents; None for a device registered with its keys (it has no token)."""
    linked_at: float = field(default_factory=time.time)
    noise_key: bytes | None = None
    """The X25519 public noise key of a device registered with its keys."""
    identity_key: bytes | None = None

    def jid(self, phone: str) -> str:
        return f"{phone.removeprefix('+')}:{self.device_id}@s.whatsapp.net"


@dataclass(frozen=True)
class Unlinked:
    device: Device
    at: float
    by: str
    """``companion`` (the device logged itself out, as a runtime does when its session is deleted) or ``phone``."""


@dataclass
class Account:
    phone: str
    push_name: str
    devices: dict[int, Device] = field(default_factory=dict)
    next_device: int = 1
    banned_until: float = 0.0
    mismatch_next_login: bool = False
    unlinked: list[Unlinked] = field(default_factory=list)

    def link(self) -> Device:
        device = Device(self.next_device, secrets.token_hex(16))
        self.devices[device.device_id] = device
        self.next_device += 1
        return device

    def register(self, device_id: int, noise_key: bytes, identity_key: bytes) -> Device:
        """A device linked earlier by another client, known by its public keys; later links get higher numbers."""
        device = Device(device_id, None, noise_key=noise_key, identity_key=identity_key)
        self.devices[device_id] = device
        self.next_device = max(self.next_device, device_id + 1)
        return device

    def unlink(self, device: Device, by: str) -> None:
        if self.devices.get(device.device_id) is device:
            del self.devices[device.device_id]
            self.unlinked.append(Unlinked(device, time.time(), by))

    def ban_remaining(self) -> float:
        return max(0.0, self.banned_until - time.time())


@dataclass(eq=False)  # identity semantics: sockets live in a set
class Socket:
    ws: web.WebSocketResponse
    phone: str
    device: Device | None = None
    qr_codes: list[str] = field(default_factory=list)
    pair_code: str | None = None
    pairing: bool = False
    """Waiting for a link; the first linker clears it, so a socket is linked at most once."""
    pairing_task: asyncio.Task[None] | None = None


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
        try:
            hello = await ws.receive_json(timeout=10)
        except (ValueError, TypeError, TimeoutError):
            hello = None
        if not isinstance(hello, dict) or hello.get("type") != "hello" or not isinstance(hello.get("phone"), str):
            await ws.close(code=4400, message=b"first frame must be hello with a phone")
            return ws
        credentials = hello.get("credentials")
        if credentials is not None and not isinstance(credentials, dict):
            await ws.close(code=4400, message=b"credentials must be null or an object")
            return ws
        conn = Socket(ws, hello["phone"])
        self.counters["connections"] += 1
        account = self.account(conn.phone)
        if account.ban_remaining() > 0:
            self.counters["refused_banned"] += 1
            await ws.send_json(_banned_frame(account))
            await ws.close()
            return ws
        self.sockets.add(conn)
        try:
            if credentials:
                if not await self._login(conn, account, credentials):
                    return ws
            else:
                conn.pairing = True
                conn.pairing_task = asyncio.create_task(self._pair(conn, account))
            await self._serve(conn, account)
        finally:
            self._forget(conn)
        return ws

    async def _login(self, conn: Socket, account: Account, credentials: dict[str, Any]) -> bool:
        try:
            device = account.devices.get(int(credentials.get("device", -1)))
        except (TypeError, ValueError):
            device = None
        by_key = "token" not in credentials and "noiseKey" in credentials
        if device is None:
            unknown = f"device {credentials.get('device')!r} is not linked to {account.phone}"
            return await self._refuse(conn, unknown if by_key else "device is not linked")
        if by_key:
            refusal = await self._prove(conn, account, device, credentials)
            if refusal is not None:
                return await self._refuse(conn, refusal)
            self.counters["logins_by_key"] += 1
        elif device.token is None or device.token != credentials.get("token"):
            return await self._refuse(conn, "device is not linked")
        await self._go_live(conn, account, device)
        return True

    async def _prove(self, conn: Socket, account: Account, device: Device, credentials: dict[str, Any]) -> str | None:
        """Challenge a device logging in by keys; None when it proved it holds its registered noise key."""
        if device.noise_key is None:
            return f"device {device.device_id} was linked here with a token; it has no registered noise key"
        if _key(credentials.get("noiseKey")) != device.noise_key:
            return f"the noise key presented is not the one registered for device {device.device_id}"
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        await conn.ws.send_json({"type": "challenge", "ephemeral": _b64(ephemeral_public)})
        try:
            answer = await conn.ws.receive_json(timeout=PROOF_TIMEOUT)
        except TimeoutError:
            return f"no proof of the noise key within {PROOF_TIMEOUT:g}s"
        except (TypeError, ValueError):  # closed, or not a JSON text frame
            answer = None
        mac = _decode(answer.get("mac")) if isinstance(answer, dict) and answer.get("type") == "proof" else None
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(device.noise_key))
        except ValueError:  # a low-order point was registered: nobody can prove it
            shared = None
        jid = device.jid(account.phone)
        if mac is None or shared is None or not hmac.compare_digest(mac, proof(shared, ephemeral_public, jid)):
            return f"wrong proof: the device does not hold the private noise key registered for {jid}"
        return None

    async def _refuse(self, conn: Socket, message: str) -> bool:
        self.counters["logins_refused"] += 1
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.send_json({"type": "logged_out", "reason": 401, "message": message})
            await conn.ws.close()
        return False

    async def _go_live(self, conn: Socket, account: Account, device: Device) -> None:
        jid = device.jid(account.phone)
        for other in [s for s in self.sockets if s is not conn and s.device is device]:
            # WhatsApp keeps the newest socket of a device and tells the older one.
            self.counters["stream_replaced"] += 1
            with contextlib.suppress(ConnectionError, RuntimeError):
                await other.ws.send_json({"type": "stream_replaced"})
                await other.ws.close()
        if conn not in self.sockets:
            return  # the socket went away meanwhile: nothing to count
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
        conn.pairing = False  # a link that comes later is a no-op
        if conn.pairing_task is not None:
            conn.pairing_task.cancel()
            conn.pairing_task = None
        if conn.device is not None:
            jid = conn.device.jid(conn.phone)
            self.live[jid] -= 1
            conn.device = None

    async def _pair(self, conn: Socket, account: Account) -> None:
        """Offer QR codes (rotating) until the device is linked; scan the first one in auto-pair mode.

        ``link`` cancels this task when someone else links the socket first, and ``_forget``
        when the socket goes away; the auto-pair scan is a no-op if the socket is no longer pairing.
        """
        with contextlib.suppress(ConnectionError, RuntimeError):
            while conn.pairing:
                code = f"2@{secrets.token_urlsafe(24)},{account.phone},{next(self._ids)}"
                conn.qr_codes.append(code)
                self.counters["qr_codes"] += 1
                await conn.ws.send_json({"type": "qr", "code": code, "expiresIn": self.qr_interval})
                if self.auto_pair is not None:
                    await asyncio.sleep(self.auto_pair)
                    if await self.link(conn, account) is None:
                        self.counters["auto_pair_skipped"] += 1
                    return
                await asyncio.sleep(self.qr_interval)

    async def link(self, conn: Socket, account: Account) -> Device | None:
        """Link a pairing socket to a new device of the account; None if it is no longer pairing."""
        if not conn.pairing or conn not in self.sockets or conn.ws.closed:
            return None
        conn.pairing = False  # claimed before any await: whoever comes second is a no-op
        if conn.pairing_task is not None and conn.pairing_task is not asyncio.current_task():
            conn.pairing_task.cancel()
        conn.pairing_task = None
        device = account.link()
        frame = {
            "type": "paired",
            "jid": device.jid(account.phone),
            "credentials": {"device": device.device_id, "token": device.token},
        }
        try:
            await conn.ws.send_json(frame)
        except (ConnectionError, RuntimeError, asyncio.CancelledError) as error:
            # The companion never got its credentials: the phone does not keep the link.
            account.devices.pop(device.device_id, None)
            self.counters["links_aborted"] += 1
            if isinstance(error, asyncio.CancelledError):
                raise
            return None
        self.counters["links"] += 1
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._go_live(conn, account, device)
        return device

    async def _serve(self, conn: Socket, account: Account) -> None:
        async for frame in conn.ws:
            if frame.type != WSMsgType.TEXT:
                break
            message = frame.json()
            kind = message.get("type")
            if kind == "pair_code_request" and conn.pairing:
                conn.pair_code = "".join(secrets.choice(_PAIR_ALPHABET) for _ in range(8))
                await conn.ws.send_json({"type": "pair_code", "code": conn.pair_code})
            elif kind == "logout" and conn.device is not None:
                # The companion logs itself out: WhatsApp forgets the device.
                account.unlink(conn.device, by="companion")
                self.counters["unlinked"] += 1
                await conn.ws.send_json({"type": "logged_out", "reason": 401, "message": "logged out by the companion"})
                await conn.ws.close()
                break
            elif kind == "send" and conn.device is not None:
                record = {
                    "id": _message_id(),
                    "from": account.phone,
                    "jid": conn.device.jid(account.phone),
                    "to": message.get("to"),
                    "text": message.get("text"),
                    "at": time.time(),
                }
                self.sent.append(record)
                await conn.ws.send_json({"type": "ack", "ref": message.get("ref"), "id": record["id"]})
                # The recipient's phone confirms at once: a receipt, as WhatsApp sends one per message.
                chat = f"{str(record['to']).removeprefix('+')}@s.whatsapp.net"
                await conn.ws.send_json({"type": "receipt", "ids": [record["id"]], "chat": chat, "status": "delivered"})

    # -- the phone's side and the operator of the sandbox ---------------------------------

    async def scan(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        code = body.get("code")
        if code is not None and not isinstance(code, str):
            raise web.HTTPBadRequest(text="code must be a string (the QR code's text)")
        pairing = [s for s in self.sockets if s.phone == phone and s.pairing]
        conn = next((s for s in pairing if code is None or (s.qr_codes and s.qr_codes[-1] == code)), None)
        if conn is None:
            if code is not None and any(code in s.qr_codes for s in self.sockets if s.phone == phone and not s.pairing):
                raise web.HTTPConflict(text=f"the device of {phone} showing that QR code is already linked")
            if not pairing:
                raise web.HTTPConflict(text=f"no device of {phone} is waiting for a QR scan")
            raise web.HTTPUnprocessableEntity(text="that QR code is not the current one (expired or unknown)")
        return await self._link_response(conn, phone)

    async def confirm_pair_code(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        code = body.get("code")
        if not isinstance(code, str):
            raise web.HTTPBadRequest(text='code must be a string, like "ABCD-EFGH"')
        conn = next((s for s in self.sockets if s.phone == phone and s.pair_code is not None and s.pairing), None)
        if conn is None:
            raise web.HTTPConflict(text=f"no device of {phone} is waiting for a pairing code")
        if code.replace("-", "").upper() != conn.pair_code:
            raise web.HTTPUnprocessableEntity(text="wrong pairing code")
        return await self._link_response(conn, phone)

    async def _link_response(self, conn: Socket, phone: str) -> web.Response:
        device = await self.link(conn, self.account(phone))
        if device is None:
            raise web.HTTPConflict(text=f"the device of {phone} was linked or went away meanwhile")
        return web.json_response({"jid": device.jid(phone), "deviceId": device.device_id})

    async def register(self, request: web.Request) -> web.Response:
        """The phone knows a device linked by another client: its number and public noise and identity keys."""
        phone = request.match_info["phone"]
        body = await _json(request)
        number = body.get("device")
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= MAX_DEVICE:
            raise web.HTTPBadRequest(text=f"device must be an integer from 1 to {MAX_DEVICE} (0 is the phone itself)")
        keys: dict[str, bytes] = {}
        for name in ("noiseKey", "identityKey"):
            key = _key(body.get(name))
            if key is None:
                raise web.HTTPBadRequest(text=f"{name} must be a 32-byte X25519 public key in base64")
            keys[name] = key
        account = self.account(phone)
        if number in account.devices:
            raise web.HTTPConflict(text=f"device {number} of {phone} is already linked")
        device = account.register(number, keys["noiseKey"], keys["identityKey"])
        self.counters["registered"] += 1
        return web.json_response({"jid": device.jid(phone), "deviceId": device.device_id}, status=201)

    async def inbound(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        sender = str(body.get("from", "+10000000000"))
        sender_jid = f"{sender.removeprefix('+')}@s.whatsapp.net"
        frame = {
            "type": "message",
            "id": str(body.get("id") or _message_id()),
            "from": sender,
            "chat": str(body.get("chat") or sender_jid),
            "text": str(body.get("text", "")),
            "at": time.time(),
        }
        targets = [s for s in self.sockets if s.phone == phone and s.device is not None]
        for conn in targets:
            await conn.ws.send_json(frame)
        return web.json_response({"delivered": len(targets), "id": frame["id"]})

    async def fault(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        body = await _json(request)
        kind = body.get("kind")
        if kind not in FAULTS:
            raise web.HTTPBadRequest(text=f"kind must be one of {', '.join(FAULTS)}")
        seconds = body.get("seconds", 60)
        if kind == "ban" and (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or not 0 < seconds <= MAX_BAN_SECONDS
        ):
            raise web.HTTPBadRequest(text=f"seconds must be a number above 0 and at most {MAX_BAN_SECONDS}")
        account = self.account(phone)
        # A ban refuses the whole account, pairing sockets included; the other faults hit live devices.
        affected = [s for s in self.sockets if s.phone == phone and (s.device is not None or kind == "ban")]
        self.counters[f"fault_{kind}"] += 1
        answer: dict[str, Any] = {"kind": kind, "affected": len(affected)}
        if kind == "identity_mismatch":
            account.mismatch_next_login = True
        if kind == "ban":
            account.banned_until = time.time() + seconds
            answer["until"] = account.banned_until
            answer["expiresAt"] = _iso(account.banned_until)
        if kind == "logout":
            for conn in affected:
                if conn.device is not None:
                    account.unlink(conn.device, by="phone")
        for conn in affected:
            frame = {
                "drop": None,
                "logout": {"type": "logged_out", "reason": 401, "message": "logged out from the phone"},
                "stream_replaced": {"type": "stream_replaced"},
                "ban": _banned_frame(account),
                "identity_mismatch": None,
            }[kind]
            conn.pairing = False
            with contextlib.suppress(ConnectionError, RuntimeError):
                if frame is not None:
                    await conn.ws.send_json(frame)
                if kind != "identity_mismatch":
                    await conn.ws.close()
        return web.json_response(answer)

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
                    phone: {
                        "devices": sorted(a.devices),
                        "unlinked": [u.device.device_id for u in a.unlinked],
                        "nextDevice": a.next_device,
                        "bannedUntil": a.banned_until if a.ban_remaining() > 0 else None,
                    }
                    for phone, a in self.accounts.items()
                },
                "pairing": sorted({s.phone for s in self.sockets if s.pairing}),
            }
        )

    async def devices(self, request: web.Request) -> web.Response:
        """The phone's Linked devices screen, plus the devices that were unlinked and by whom."""
        phone = request.match_info["phone"]
        account = self.accounts.get(phone)
        if account is None:
            raise web.HTTPNotFound(text=f"the simulator has never seen an account {phone}")
        return web.json_response(
            {
                "phone": phone,
                "linked": [
                    {
                        "deviceId": d.device_id,
                        "jid": d.jid(phone),
                        "linkedAt": d.linked_at,
                        "live": self.live.get(d.jid(phone), 0),
                        "noiseKey": _b64(d.noise_key) if d.noise_key is not None else None,
                    }
                    for d in sorted(account.devices.values(), key=lambda d: d.device_id)
                ],
                "unlinked": [
                    {
                        "deviceId": u.device.device_id,
                        "jid": u.device.jid(phone),
                        "linkedAt": u.device.linked_at,
                        "unlinkedAt": u.at,
                        "by": u.by,
                    }
                    for u in account.unlinked
                ],
                "nextDevice": account.next_device,
                "bannedUntil": account.banned_until if account.ban_remaining() > 0 else None,
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
                web.get("/v1/phones/{phone}/devices", self.devices),
                web.post("/v1/phones/{phone}/devices", self.register),
                web.get("/v1/messages", self.messages),
                web.get("/v1/stats", self.stats),
                web.get("/healthz", self.healthz),
            ]
        )
        return app


def _banned_frame(account: Account) -> dict[str, Any]:
    """``until``: the ban's expiry in epoch seconds (what the runtime reports); ``expiresIn``: seconds left."""
    return {"type": "banned", "until": account.banned_until, "expiresIn": round(account.ban_remaining(), 3)}


def proof(shared: bytes, ephemeral_public: bytes, jid: str) -> bytes:
    """What a device logging in by keys answers: HMAC-SHA256 keyed with the X25519 secret, over ephemeral + JID."""
    return hmac.new(shared, ephemeral_public + jid.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode(value: object) -> bytes | None:
    """Strict base64 text as bytes; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _key(value: object) -> bytes | None:
    """A 32-byte X25519 public key from base64 text; None when it is not one."""
    key = _decode(value)
    return key if key is not None and len(key) == 32 else None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _message_id() -> str:
    """A message id as WhatsApp Web writes them (3EB0 and hex)."""
    return f"3EB0{secrets.token_hex(8).upper()}"


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
