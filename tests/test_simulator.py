"""The WhatsApp simulator, served for real in-process: linking, bans with an expiry, the per-account device view.

The runtime's side is played by raw WebSockets and by the runtime's own ``SimulatorTransport``,
so what the simulator sends is checked against what the runtime reads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tests.test_legacy_import import baileys_creds
from waso.legacy.importer import STORE_FILE, device_row, public_key, read_row, write_store
from waso.session_runtime.simulator_transport import SimulatorTransport
from waso.session_runtime.transport import Connected, LoggedOut, Paired, QrCode, SessionIdentity, TemporaryBan
from waso.simulator import server
from waso.simulator.server import Simulator, proof

PHONE = "+4915110000001"
IMPORTED = "51949376824"
T = TypeVar("T")


@dataclass
class Sandbox:
    simulator: Simulator
    url: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, raw: str | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with self.http.request(method, self.url + path, data=data) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def devices(self, phone: str = PHONE) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/phones/{phone}/devices")
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    async def companion(self, phone: str = PHONE, credentials: dict[str, Any] | None = None) -> Companion:
        ws = await self.http.ws_connect(self.url + "/v1/socket")
        await ws.send_json({"type": "hello", "phone": phone, "credentials": credentials})
        return Companion(ws)

    def transport(self, tmp_path: Path, phone: str = PHONE) -> SimulatorTransport:
        identity = SessionIdentity("tenant", "s1", phone, "waso", tmp_path / "store")
        return SimulatorTransport(identity, self.url, self.http)


@dataclass
class Companion:
    """A raw device socket, as the runtime's transport opens it."""

    ws: aiohttp.ClientWebSocketResponse

    async def frame(self, kind: str, within: float = 10) -> dict[str, Any]:
        """The next frame of that type (frames of other types are skipped)."""
        async with asyncio.timeout(within):
            async for message in self.ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frame: dict[str, Any] = json.loads(message.data)
                if frame.get("type") == kind:
                    return frame
        raise AssertionError(f"the socket closed before a {kind!r} frame")

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def sandbox(**options: Any) -> AsyncIterator[Sandbox]:
    simulator = Simulator(**options)
    server = TestServer(simulator.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield Sandbox(simulator, f"http://127.0.0.1:{server.port}", http)
    finally:
        await server.close()


async def until(probe: Callable[[], Awaitable[T | None]], *, within: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(0.05)


async def next_event(transport: SimulatorTransport, kind: type[T], within: float = 10) -> T:
    async with asyncio.timeout(within):
        while True:
            event = await transport.events.get()
            if isinstance(event, kind):
                return event


# -- one link per pairing ---------------------------------------------------------------------


async def test_a_manual_scan_before_auto_pair_links_exactly_one_device() -> None:
    async with sandbox(auto_pair=0.5, first_device=11) as box:
        device = await box.companion()
        qr = await device.frame("qr")
        (conn,) = box.simulator.sockets
        timer = conn.pairing_task
        assert timer is not None

        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr["code"]})
        assert status == 200, body
        assert body["deviceId"] == 11
        paired = await device.frame("paired")
        assert paired["credentials"]["device"] == 11
        assert (await device.frame("connected"))["jid"] == paired["jid"]

        async def timer_done() -> bool:
            return timer.done()

        await until(timer_done, within=5, what="the auto-pair timer to be cancelled by the scan")
        assert timer.cancelled()
        assert await box.simulator.link(conn, box.simulator.account(PHONE)) is None  # a late auto-pair: no-op

        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr["code"]})
        assert status == 409, body
        assert "already linked" in body, body
        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan")
        assert status == 409, body

        view = await box.devices()
        assert [d["deviceId"] for d in view["linked"]] == [11]
        assert view["linked"][0]["live"] == 1
        assert view["nextDevice"] == 12
        assert view["unlinked"] == []
        assert box.simulator.counters["links"] == 1
        await device.close()


async def test_auto_pair_before_a_manual_scan_leaves_the_scan_a_409() -> None:
    async with sandbox(auto_pair=0.05, first_device=11) as box:
        device = await box.companion()
        qr = await device.frame("qr")
        paired = await device.frame("paired")
        assert paired["credentials"]["device"] == 11
        await device.frame("connected")

        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr["code"]})
        assert status == 409, body
        view = await box.devices()
        assert [d["deviceId"] for d in view["linked"]] == [11]
        assert box.simulator.counters["links"] == 1
        await device.close()


@pytest.mark.parametrize("auto_pair", [None, 0.0])
async def test_simultaneous_linkers_link_each_socket_once(auto_pair: float | None) -> None:
    """Scans, a pairing code and the auto-pair timer racing for the same sockets: one link each."""
    phones = [f"+49151200000{i:02d}" for i in range(8)]
    async with sandbox(auto_pair=auto_pair, first_device=11) as box:
        devices = [await box.companion(phone) for phone in phones]
        codes = [(await device.frame("qr"))["code"] for device in devices]
        attempts: list[Awaitable[tuple[int, Any]]] = []
        for phone, device, code in zip(phones, devices, codes, strict=True):
            attempts += [box.call("POST", f"/v1/phones/{phone}/scan", {"code": code}) for _ in range(2)]
            if auto_pair is None:
                await device.ws.send_json({"type": "pair_code_request"})
                pair_code = (await device.frame("pair_code"))["code"]
                attempts.append(box.call("POST", f"/v1/phones/{phone}/pair-code", {"code": pair_code}))
        answers = await asyncio.gather(*attempts)

        per_phone = len(answers) // len(phones)
        for index, (phone, device) in enumerate(zip(phones, devices, strict=True)):
            mine = answers[index * per_phone : (index + 1) * per_phone]
            assert all(status in (200, 409) for status, _ in mine), mine
            wins = [body for status, body in mine if status == 200]
            assert len(wins) == 1 if auto_pair is None else len(wins) <= 1, mine  # auto-pair may win
            paired = await device.frame("paired")
            assert paired["credentials"]["device"] == 11
            assert all(win["deviceId"] == 11 for win in wins)
            view = await box.devices(phone)
            assert [d["deviceId"] for d in view["linked"]] == [11], view
            assert view["nextDevice"] == 12, view
        assert box.simulator.counters["links"] == len(phones)
        for device in devices:
            await device.close()


async def test_a_socket_that_went_away_is_not_linked() -> None:
    async with sandbox(auto_pair=30) as box:
        device = await box.companion()
        qr = await device.frame("qr")
        (conn,) = box.simulator.sockets
        timer = conn.pairing_task
        assert timer is not None
        await device.close()

        async def gone() -> bool:
            return not box.simulator.sockets and timer.done()

        await until(gone, within=5, what="the socket to be forgotten and its auto-pair timer cancelled")
        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr["code"]})
        assert status == 409, body
        assert await box.simulator.link(conn, box.simulator.account(PHONE)) is None
        assert (await box.devices())["linked"] == []


async def test_bad_link_requests_are_4xx() -> None:
    async with sandbox() as box:
        device = await box.companion()
        await device.frame("qr")
        for path, body, raw, expected in [
            ("scan", None, "{not json", 400),
            ("scan", None, "[1]", 400),
            ("scan", {"code": 7}, None, 400),
            ("scan", {"code": "2@old"}, None, 422),
            ("pair-code", {}, None, 400),
            ("pair-code", {"code": "ABCD-EFGH"}, None, 409),  # no pairing code requested
        ]:
            status, answer = await box.call("POST", f"/v1/phones/{PHONE}/{path}", body, raw)
            assert status == expected, (path, body, raw, answer)
        status, answer = await box.call("POST", "/v1/phones/+4900000000/scan", {})
        assert status == 409, answer
        await device.close()


# -- a temporary ban with an expiry --------------------------------------------------------------


async def test_a_ban_reaches_the_runtime_with_its_expiry_and_lifts_by_itself(tmp_path: Path) -> None:
    async with sandbox(first_device=11) as box:
        first = box.transport(tmp_path)
        await first.start()
        qr = await next_event(first, QrCode)
        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr.code})
        assert status == 200, body
        jid = (await next_event(first, Paired)).jid
        assert (await next_event(first, Connected)).jid == jid

        status, ban = await box.call("POST", f"/v1/phones/{PHONE}/faults", {"kind": "ban", "seconds": 2})
        assert status == 200, ban
        assert ban["kind"] == "ban"
        assert ban["affected"] == 1
        until = datetime.fromtimestamp(ban["until"], UTC)
        assert datetime.fromisoformat(ban["expiresAt"]) == until
        assert 0 < (until - datetime.now(UTC)).total_seconds() <= 2
        event = await next_event(first, TemporaryBan)
        assert event.until == until  # the runtime reports exactly this expiry
        await first.stop()
        assert (await box.devices())["bannedUntil"] == ban["until"]

        # Reconnecting while banned is refused with the same expiry; afterwards the same device logs in.
        refused, deadline = 0, until + timedelta(seconds=10)
        while True:
            attempt = box.transport(tmp_path)
            await attempt.start()
            async with asyncio.timeout(10):
                outcome = await attempt.events.get()
            await attempt.stop()
            if isinstance(outcome, Connected):
                break
            assert isinstance(outcome, TemporaryBan), outcome
            assert outcome.until == until
            refused += 1
            assert datetime.now(UTC) < deadline, "the ban did not lift by itself"
            await asyncio.sleep(0.1)  # the polling interval between reconnect attempts
        assert outcome.jid == jid
        assert datetime.now(UTC) >= until
        assert refused >= 1
        assert box.simulator.counters["refused_banned"] == refused
        view = await box.devices()
        assert view["bannedUntil"] is None
        assert [d["deviceId"] for d in view["linked"]] == [11]


async def test_a_ban_refuses_pairing_sockets_too() -> None:
    async with sandbox() as box:
        device = await box.companion()
        await device.frame("qr")
        status, ban = await box.call("POST", f"/v1/phones/{PHONE}/faults", {"kind": "ban", "seconds": 60})
        assert status == 200, ban
        assert ban["affected"] == 1, ban
        frame = await device.frame("banned")
        assert frame["until"] == ban["until"]
        assert 0 < frame["expiresIn"] <= 60
        status, body = await box.call("POST", f"/v1/phones/{PHONE}/scan")
        assert status == 409, body
        late = await box.companion()
        assert (await late.frame("banned"))["until"] == ban["until"]
        assert (await box.devices())["linked"] == []


@pytest.mark.parametrize(
    ("body", "raw"),
    [
        ({"kind": "ban", "seconds": 0}, None),
        ({"kind": "ban", "seconds": -5}, None),
        ({"kind": "ban", "seconds": "10"}, None),
        ({"kind": "ban", "seconds": True}, None),
        ({"kind": "ban", "seconds": 1e12}, None),
        ({"kind": "ban", "seconds": None}, None),
        ({"kind": "nap"}, None),
        ({}, None),
        (None, "[]"),
        (None, "ban"),
    ],
)
async def test_bad_fault_requests_are_400(body: Any, raw: str | None) -> None:
    async with sandbox() as box:
        status, answer = await box.call("POST", f"/v1/phones/{PHONE}/faults", body, raw)
        assert status == 400, answer
        assert not any(name.startswith("fault_") for name in box.simulator.counters)
        assert box.simulator.accounts.get(PHONE) is None or not box.simulator.accounts[PHONE].banned_until


# -- the per-account device view ------------------------------------------------------------------


async def test_unlinked_devices_show_in_the_per_account_view(tmp_path: Path) -> None:
    async with sandbox(first_device=11) as box:
        transport = box.transport(tmp_path)
        await transport.start()
        qr = await next_event(transport, QrCode)
        assert (await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr.code}))[0] == 200
        await next_event(transport, Connected)
        view = await box.devices()
        (linked,) = view["linked"]
        assert linked["deviceId"] == 11
        assert linked["jid"] == "4915110000001:11@s.whatsapp.net"
        await transport.stop()

        await transport.unlink()  # what the runtime does when its session is deleted
        view = await box.devices()
        assert view["linked"] == []
        (gone,) = view["unlinked"]
        assert (gone["deviceId"], gone["jid"], gone["by"]) == (11, linked["jid"], "companion")
        assert gone["linkedAt"] == linked["linkedAt"] <= gone["unlinkedAt"] <= time.time()

        # A second device, logged out from the phone's side.
        again = box.transport(tmp_path / "another")  # a new session: the deleted one's store is gone
        await again.start()
        qr = await next_event(again, QrCode)
        assert (await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr.code}))[0] == 200
        await next_event(again, Connected)
        assert [d["deviceId"] for d in (await box.devices())["linked"]] == [12]
        assert (await box.call("POST", f"/v1/phones/{PHONE}/faults", {"kind": "logout"}))[0] == 200
        await again.stop()
        view = await box.devices()
        assert view["linked"] == []
        assert view["nextDevice"] == 13
        assert [(u["deviceId"], u["by"]) for u in view["unlinked"]] == [(11, "companion"), (12, "phone")]

        status, stats = await box.call("GET", "/v1/stats")
        assert status == 200
        assert stats["accounts"][PHONE] == {"devices": [], "unlinked": [11, 12], "nextDevice": 13, "bannedUntil": None}
        assert stats["counters"]["unlinked"] == 1  # counts the companions' own logouts, as before

        status, answer = await box.call("GET", "/v1/phones/+4900000000/devices")
        assert status == 404, answer
        assert "+4900000000" in answer, answer


# -- a device linked by another client: registered by its keys, logged in by proving them ----------


def x25519_pair() -> tuple[bytes, bytes]:
    """A random Curve25519 private key and its public key."""
    private = X25519PrivateKey.generate()
    raw = Encoding.Raw
    return private.private_bytes(raw, PrivateFormat.Raw, NoEncryption()), private.public_key().public_bytes(
        raw, PublicFormat.Raw
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def register(box: Sandbox, device: int, noise_public: bytes, phone: str = PHONE) -> tuple[int, Any]:
    body = {"device": device, "noiseKey": b64(noise_public), "identityKey": b64(x25519_pair()[1])}
    return await box.call("POST", f"/v1/phones/{phone}/devices", body)


async def key_login(box: Sandbox, device: int, noise_private: bytes, phone: str = PHONE) -> Companion:
    """A raw socket logging in by keys, answering the challenge as the runtime's transport does."""
    noise = X25519PrivateKey.from_private_bytes(noise_private)
    public = noise.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    companion = await box.companion(phone, {"device": device, "noiseKey": b64(public)})
    ephemeral = base64.b64decode((await companion.frame("challenge"))["ephemeral"])
    shared = noise.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    jid = f"{phone.removeprefix('+')}:{device}@s.whatsapp.net"
    await companion.ws.send_json({"type": "proof", "mac": b64(proof(shared, ephemeral, jid))})
    return companion


async def test_registering_a_device_linked_elsewhere() -> None:
    async with sandbox(first_device=11) as box:
        noise_public = x25519_pair()[1]
        status, body = await register(box, 47, noise_public)
        assert status == 201, body
        assert body == {"jid": "4915110000001:47@s.whatsapp.net", "deviceId": 47}
        view = await box.devices()
        (linked,) = view["linked"]
        assert (linked["deviceId"], linked["jid"], linked["live"]) == (47, body["jid"], 0)
        assert linked["noiseKey"] == b64(noise_public)
        assert view["nextDevice"] == 48  # numbers grow above the registered device
        assert box.simulator.counters["registered"] == 1

        status, answer = await register(box, 47, x25519_pair()[1])
        assert status == 409, answer
        assert "device 47 of +4915110000001 is already linked" in answer
        status, answer = await register(box, 12, x25519_pair()[1])  # below nextDevice, but free
        assert status == 201, answer
        assert (await box.devices())["nextDevice"] == 48

        # A QR link afterwards gets the next number; its number cannot be registered again either.
        device = await box.companion()
        qr = await device.frame("qr")
        status, scanned = await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr["code"]})
        assert status == 200, scanned
        assert scanned["deviceId"] == 48
        status, answer = await register(box, 48, x25519_pair()[1])
        assert status == 409, answer
        view = await box.devices()
        assert [(d["deviceId"], d["noiseKey"] is not None) for d in view["linked"]] == [
            (12, True),
            (47, True),
            (48, False),
        ]
        await device.close()


@pytest.mark.parametrize(
    ("body", "raw", "said"),
    [
        ({"device": 0, "noiseKey": "K", "identityKey": "K"}, None, "0 is the phone itself"),
        ({"device": -3, "noiseKey": "K", "identityKey": "K"}, None, "device must be an integer"),
        ({"device": True, "noiseKey": "K", "identityKey": "K"}, None, "device must be an integer"),
        ({"device": "47", "noiseKey": "K", "identityKey": "K"}, None, "device must be an integer"),
        ({"device": 70000, "noiseKey": "K", "identityKey": "K"}, None, "from 1 to 65535"),
        ({"noiseKey": "K", "identityKey": "K"}, None, "device must be an integer"),
        ({"device": 47, "identityKey": "K"}, None, "noiseKey must be a 32-byte X25519 public key"),
        ({"device": 47, "noiseKey": "not base64!", "identityKey": "K"}, None, "noiseKey must be"),
        ({"device": 47, "noiseKey": "S" * 43, "identityKey": "K"}, None, "noiseKey must be"),  # 31 bytes
        ({"device": 47, "noiseKey": "K", "identityKey": b64(b"\x05" + bytes(32))}, None, "identityKey must be"),
        ({"device": 47, "noiseKey": "K", "identityKey": 32}, None, "identityKey must be"),
        (None, "{not json", "body must be JSON"),
        (None, "[47]", "body must be a JSON object"),
    ],
)
async def test_bad_registrations_are_400(body: Any, raw: str | None, said: str) -> None:
    key = b64(x25519_pair()[1])
    if isinstance(body, dict):
        body = {name: key if value == "K" else value for name, value in body.items()}
    async with sandbox() as box:
        status, answer = await box.call("POST", f"/v1/phones/{PHONE}/devices", body, raw)
        assert status == 400, answer
        assert said in answer, answer
        assert PHONE not in box.simulator.accounts or not box.simulator.accounts[PHONE].devices
        assert box.simulator.counters["registered"] == 0


async def test_a_registered_device_logs_in_by_its_keys_and_a_second_socket_replaces_the_first() -> None:
    async with sandbox() as box:
        noise_private, noise_public = x25519_pair()
        assert (await register(box, 47, noise_public))[0] == 201
        jid = "4915110000001:47@s.whatsapp.net"

        first = await key_login(box, 47, noise_private)
        connected = await first.frame("connected")
        assert connected["jid"] == jid
        assert box.simulator.live[jid] == 1
        assert (await box.devices())["linked"][0]["live"] == 1

        second = await key_login(box, 47, noise_private)
        assert (await second.frame("connected"))["jid"] == jid
        await first.frame("stream_replaced")  # the older socket is told and closed, as with a token

        async def one_live() -> bool:
            return box.simulator.live[jid] == 1 and len(box.simulator.sockets) == 1

        await until(one_live, within=5, what="one live socket of device 47")
        assert box.simulator.max_live[jid] == 1
        counters = box.simulator.counters
        assert (counters["logins"], counters["logins_by_key"], counters["stream_replaced"]) == (2, 2, 1)
        assert counters["logins_refused"] == 0
        assert counters["links"] == counters["qr_codes"] == 0  # never paired
        await second.close()


async def test_key_logins_are_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "PROOF_TIMEOUT", 0.3)
    async with sandbox() as box:
        noise_private, noise_public = x25519_pair()
        assert (await register(box, 47, noise_public))[0] == 201
        other_private, other_public = x25519_pair()

        async def refused(companion: Companion, said: str) -> None:
            """The next frame (after the challenge, if one was already read) is the refusal."""
            frame = await companion.ws.receive_json(timeout=5)
            assert frame["type"] == "logged_out", frame
            assert frame["reason"] == 401
            assert said in frame["message"], frame
            await companion.close()

        # Unknown device and another noise key: refused before any challenge.
        unknown = await box.companion(credentials={"device": 48, "noiseKey": b64(noise_public)})
        await refused(unknown, "device 48 is not linked to +4915110000001")
        another_key = await box.companion(credentials={"device": 47, "noiseKey": b64(other_public)})
        await refused(another_key, "the noise key presented is not the one registered for device 47")
        # The registered public key, without its private half: the proof is wrong.
        impostor = await box.companion(credentials={"device": 47, "noiseKey": b64(noise_public)})
        ephemeral = base64.b64decode((await impostor.frame("challenge"))["ephemeral"])
        guessed = X25519PrivateKey.from_private_bytes(other_private).exchange(
            X25519PublicKey.from_public_bytes(ephemeral)
        )
        await impostor.ws.send_json(
            {"type": "proof", "mac": b64(proof(guessed, ephemeral, "4915110000001:47@s.whatsapp.net"))}
        )
        await refused(impostor, "wrong proof")
        garbled = await box.companion(credentials={"device": 47, "noiseKey": b64(noise_public)})
        await garbled.frame("challenge")
        await garbled.ws.send_json({"type": "proof", "mac": "not base64!"})
        await refused(garbled, "wrong proof")
        silent = await box.companion(credentials={"device": 47, "noiseKey": b64(noise_public)})
        await silent.frame("challenge")
        await refused(silent, "no proof of the noise key within 0.3s")
        # A registered device has no token; a device linked with a token has no noise key.
        await refused(await box.companion(credentials={"device": 47, "token": None}), "device is not linked")
        await refused(await box.companion(credentials={"device": 47, "token": ""}), "device is not linked")
        pairing = await box.companion()
        qr = await pairing.frame("qr")
        assert (await box.call("POST", f"/v1/phones/{PHONE}/scan", {"code": qr["code"]}))[0] == 200
        linked = await pairing.frame("paired")
        await pairing.frame("connected")
        token_device = {"device": linked["credentials"]["device"], "noiseKey": b64(noise_public)}
        await refused(await box.companion(credentials=token_device), "was linked here with a token")

        counters = box.simulator.counters
        assert counters["logins_refused"] == 8
        assert counters["logins_by_key"] == 0
        assert box.simulator.live["4915110000001:47@s.whatsapp.net"] == 0
        survivor = await key_login(box, 47, noise_private)  # the refusals forgot nothing
        assert (await survivor.frame("connected"))["jid"] == "4915110000001:47@s.whatsapp.net"
        await survivor.close()
        await pairing.close()


async def test_the_transport_logs_an_imported_store_in_by_keys(tmp_path: Path) -> None:
    async with sandbox(first_device=11) as box:
        creds = baileys_creds(f"{IMPORTED}.0:47@s.whatsapp.net")
        row = device_row(creds, IMPORTED)
        write_store(row, tmp_path / "store")
        noise_public = public_key(creds["_private"]["noise"])
        assert (await register(box, 47, noise_public, f"+{IMPORTED}"))[0] == 201
        jid = f"{IMPORTED}:47@s.whatsapp.net"

        transport = box.transport(tmp_path, f"+{IMPORTED}")
        assert transport.stored_jid() == jid  # the runtime connects instead of pairing
        await transport.start()
        assert (await next_event(transport, Connected)).jid == jid
        assert box.simulator.counters["logins_by_key"] == 1
        assert box.simulator.counters["qr_codes"] == 0
        await transport.stop()
        assert not (tmp_path / "store" / "simulator-credentials.json").exists()  # the store stays the import

        await transport.unlink()  # a deleted session logs its device out by keys too
        view = await box.devices(f"+{IMPORTED}")
        assert view["linked"] == []
        assert [(u["deviceId"], u["by"]) for u in view["unlinked"]] == [(47, "companion")]


async def test_a_refused_key_login_forgets_the_imported_device_and_pairs_again(tmp_path: Path) -> None:
    async with sandbox(first_device=11) as box:
        creds = baileys_creds(f"{IMPORTED}.0:47@s.whatsapp.net")
        write_store(device_row(creds, IMPORTED), tmp_path / "store")
        assert (await register(box, 47, x25519_pair()[1], f"+{IMPORTED}"))[0] == 201  # WhatsApp knows another key

        transport = box.transport(tmp_path, f"+{IMPORTED}")
        await transport.start()
        ended = await next_event(transport, LoggedOut)
        assert "the noise key presented is not the one registered for device 47" in ended.reason
        await transport.stop()
        # As whatsmeow deletes its device on a 401: the row is gone, the session pairs afresh.
        assert read_row(tmp_path / "store" / STORE_FILE) is None
        again = box.transport(tmp_path, f"+{IMPORTED}")
        assert again.stored_jid() is None
        await again.start()
        await next_event(again, QrCode)
        await again.stop()
