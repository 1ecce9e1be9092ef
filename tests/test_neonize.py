"""The neonize transport with the real library: stores, real event objects, no-network behaviour."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from neonize.aioze.client import ClientFactory
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
from neonize.proto.Neonize_pb2 import JID, ConnectFailureReason, MessageInfo, MessageSource
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message
from neonize.utils.jid import build_jid

from tests.neonize_offline import FAKE_JID, FAKE_PAIR_CODE, fake_pairing_command
from waso.session_runtime.neonize_pairing import EXIT_PARENT_GONE, KILL_GRACE
from waso.session_runtime.neonize_transport import STORE_FILE, NeonizeTransport, jid_text, map_event, stored_jid
from waso.session_runtime.transport import (
    AckStatus,
    Connected,
    Disconnected,
    IncomingMessage,
    LoggedOut,
    MessageAck,
    Paired,
    QrCode,
    SessionIdentity,
    StreamReplaced,
    TemporaryBan,
    TransportEvent,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
EMPTY = JID(User="", Server="", Device=0, RawAgent=0, Integrator=0, IsEmpty=True)
ME = JID(User="4915112345601", Device=53, Server="s.whatsapp.net", RawAgent=0, Integrator=0, IsEmpty=False)


def roundtrip(event: object) -> object:
    """Serialize and parse, as the events arrive from whatsmeow through the FFI."""
    return type(event).FromString(event.SerializeToString())  # type: ignore[attr-defined]


READ_AT = datetime.fromtimestamp(1700000001, UTC)


def test_real_neonize_events_map_to_transport_events() -> None:
    sender = build_jid("15552223333")
    message = MessageEv(
        Info=MessageInfo(
            MessageSource=MessageSource(Chat=sender, Sender=sender, IsFromMe=False, IsGroup=False,
                                        SenderAlt=EMPTY, RecipientAlt=EMPTY, BroadcastListOwner=EMPTY),
            ID="3EB0ABC", ServerID=0, Type="text", Pushname="Bob", Timestamp=1700000000, Category="",
            Multicast=False, MediaType="", Edit="",
        ),
        Message=Message(conversation="hello"),
        IsEphemeral=False, IsViewOnce=False, IsViewOnceV2=False, IsViewOnceV2Extension=False,
        IsDocumentWithCaption=False, IsLottieSticker=False, IsEdit=False, UnavailableRequestID="", RetryCount=0,
    )  # fmt: skip
    cases = [
        (PairStatusEv(ID=ME, BusinessName="", Platform="android", Status=PairStatusEv.SUCCESS),
         Paired("4915112345601:53@s.whatsapp.net")),
        (PairStatusEv(ID=ME, BusinessName="", Platform="", Status=PairStatusEv.PStatus.ERROR, Error="boom"),
         Disconnected("pairing failed: boom")),
        (LoggedOutEv(OnConnect=True, Reason=ConnectFailureReason.LOGGED_OUT), LoggedOut("LOGGED_OUT on connect")),
        (StreamReplacedEv(), StreamReplaced()),
        (TemporaryBanEv(Code=TemporaryBanEv.SEND_TO_TOO_MANY_PEOPLE, Expire=3600),
         TemporaryBan(NOW + timedelta(hours=1), "temporary ban (code 1)")),
        (DisconnectedEv(status=True), Disconnected("disconnected by WhatsApp")),
        (message, IncomingMessage("15552223333@s.whatsapp.net", "hello", "3EB0ABC", "15552223333@s.whatsapp.net",
                                  datetime.fromtimestamp(1700000000, UTC))),
        (ReceiptEv(MessageSource=message.Info.MessageSource, MessageIDs=["3EB0ABC"], Timestamp=1700000001,
                   Type=ReceiptEv.READ),
         MessageAck(("3EB0ABC",), "15552223333@s.whatsapp.net", AckStatus.READ, READ_AT)),
        (ReceiptEv(MessageSource=message.Info.MessageSource, MessageIDs=["3EB0ABC"], Timestamp=1700000001,
                   Type=ReceiptEv.RETRY), None),
        (ConnectedEv(status=True), None),  # connection is read from client.me by the transport
    ]  # fmt: skip
    for event, expected in cases:
        assert map_event(roundtrip(event), NOW) == expected


def test_jids_are_formatted_with_their_device() -> None:
    assert jid_text(ME) == "4915112345601:53@s.whatsapp.net"
    assert jid_text(build_jid("4915112345601")) == "4915112345601@s.whatsapp.net"


def test_each_session_gets_its_own_store_and_its_identity_is_read_without_connecting(tmp_path: Path) -> None:
    stores = [tmp_path / name / STORE_FILE for name in ("s1", "s2")]
    for store in stores:
        store.parent.mkdir()
        assert ClientFactory.get_all_devices_from_db(str(store)) == []  # whatsmeow creates its schema
    assert stored_jid(stores[0]) is None  # never paired
    assert stored_jid(tmp_path / "missing" / STORE_FILE) is None

    with sqlite3.connect(stores[0]) as db:  # what whatsmeow writes after pairing
        db.execute(
            "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, signed_pre_key,"
            " signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig,"
            " adv_account_sig_key, adv_device_sig) VALUES (?, 1, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
            ("4915112345601:53@s.whatsapp.net", b"k" * 32, b"i" * 32, b"s" * 32, b"g" * 64,
             b"a", b"d", b"x" * 64, b"y" * 32, b"z" * 64),
        )  # fmt: skip
    assert stored_jid(stores[0]) == "4915112345601:53@s.whatsapp.net"
    assert stored_jid(stores[1]) is None
    devices = ClientFactory.get_all_devices_from_db(str(stores[0]))
    assert [jid_text(d.JID) for d in devices] == ["4915112345601:53@s.whatsapp.net"]


def most_attempts(seconds: float) -> int:
    """Attempts possible in ``seconds`` with the supervisor's back-off (waits of at least half of 1 s doubling)."""
    attempts, waited, ceiling = 1, 0.0, 1.0
    while waited + ceiling / 2 <= seconds:
        waited += ceiling / 2
        attempts += 1
        ceiling = min(60.0, ceiling * 2)
    return attempts


def test_connecting_without_network_ends_disconnected_with_back_off(tmp_path: Path) -> None:
    """Never paired, so every attempt pairs in a child (real neonize) that fails to dial; nothing is left over."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to run without network"
    result = subprocess.run(
        [unshare, "--net", sys.executable, "-m", "tests.neonize_offline", str(tmp_path), "8"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("s1", "s2"):
        states = [r["state"] for r in outcome["reports"][name]]
        assert "Connecting" in states
        assert "Disconnected" in states
        errors = [r["lastError"] for r in outcome["reports"][name] if "lastError" in r]
        assert any("failed to dial whatsapp web websocket" in e for e in errors), errors
        assert states[-1] == "Stopped"
        # Back-off, never a busy loop: at most one attempt more than the shortest waits allow.
        assert 2 <= outcome["attempts"][name] <= most_attempts(outcome["elapsed"]), outcome
        assert outcome["files"][name] == [], outcome["files"]  # no store (never paired), no pairing leftovers
    assert outcome["workers_seen"] >= 2  # the pairing ran in child processes ...
    assert outcome["children_left"] == []  # ... all of them ended and reaped
    assert outcome["threads_left"] == []
    assert outcome["cpu"] < 6.0, outcome["cpu"]


@pytest.mark.parametrize("name", ["s1"])
def test_store_path_is_absolute_even_from_a_relative_data_dir(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from waso.session_runtime.neonize_transport import NeonizeTransport
    from waso.session_runtime.transport import SessionIdentity

    monkeypatch.chdir(tmp_path)
    transport = NeonizeTransport(SessionIdentity("acme", name, "+4915112345601", "waso", Path("data") / name))
    assert transport.store.is_absolute()
    assert transport.store == tmp_path / "data" / name / STORE_FILE


# -- pairing in a child process ---------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def process_state(pid: int) -> str | None:
    """The state letter of a process (Z: a zombie, not reaped); None when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


async def until(probe: Callable[[], object], *, within: float, what: str) -> None:
    """Poll ``probe`` until it returns something truthy, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not (last := probe()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(0.02)


async def next_event(transport: NeonizeTransport, within: float = 60) -> TransportEvent:
    async with asyncio.timeout(within):
        return await transport.events.get()


def session(tmp_path: Path) -> SessionIdentity:
    return SessionIdentity("acme", "s1", "+4915112345601", "waso", tmp_path / "sessions" / "s1")


@pytest.fixture
def child_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake pairing child imports tests.neonize_offline."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


@pytest.mark.usefixtures("child_path")
@pytest.mark.parametrize("mode", ["hang", "hang-ignore-term"])
def test_a_hanging_pairing_worker_is_ended_and_its_resources_come_back(mode: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        threads, fds = threading.active_count(), fd_count()
        transport = NeonizeTransport(session(tmp_path), pairing_command=fake_pairing_command(mode))
        await transport.start()
        event = await next_event(transport)
        assert isinstance(event, QrCode)
        assert event.code == "fake-qr-1"
        worker = transport.pairing_worker
        assert worker is not None
        assert worker.started == {"event": "started", "pid": worker.pid, "pdeathsig": signal.SIGKILL}
        assert process_state(worker.pid) not in (None, "Z")
        assert (tmp_path / "sessions" / "s1" / (STORE_FILE + ".pairing")).parent.is_dir()

        begun = time.monotonic()
        await transport.stop()
        took = time.monotonic() - begun
        if mode == "hang":
            assert worker.returncode == -signal.SIGTERM
            assert took < KILL_GRACE, took
        else:  # deaf to SIGTERM: killed after the grace period
            assert worker.returncode == -signal.SIGKILL, worker.returncode
            assert KILL_GRACE * 0.9 <= took < KILL_GRACE + 2, took
        assert process_state(worker.pid) is None  # reaped, not a zombie
        await until(lambda: threading.active_count() <= threads, within=5, what="the attempt's threads to end")
        await until(lambda: fd_count() <= fds, within=5, what="the attempt's pipes to close")
        assert list((tmp_path / "sessions" / "s1").iterdir()) == []  # its temporary store is gone
        await transport.stop()  # idempotent

    asyncio.run(scenario())


@pytest.mark.usefixtures("child_path")
def test_pairing_children_are_capped_per_pod_and_a_waiting_attempt_stops_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        slots = asyncio.Semaphore(1)
        first, second = (
            NeonizeTransport(
                SessionIdentity("acme", name, phone, "waso", tmp_path / "sessions" / name),
                pairing_command=fake_pairing_command("hang"),
                pairing_slots=slots,
            )
            for name, phone in (("s1", "+4915112345601"), ("s2", "+4915112345602"))
        )
        await first.start()
        await second.start()
        assert isinstance(await next_event(first), QrCode)
        assert second.pairing_worker is None  # waits for the slot: no second child
        await first.stop()
        assert isinstance(await next_event(second), QrCode)  # the freed slot goes to the waiting one
        assert second.pairing_worker is not None
        await second.stop()
        assert not slots.locked()

        third = NeonizeTransport(session(tmp_path), pairing_command=fake_pairing_command("hang"), pairing_slots=slots)
        async with slots:  # every slot taken: stopping the waiting attempt neither blocks nor leaks one
            await third.start()
            await third.stop()
            assert third.pairing_worker is None
        assert not slots.locked()

    asyncio.run(scenario())


class ConnectsOffline(NeonizeTransport):
    """The in-process connection from stored credentials, without WhatsApp: connected as the store says."""

    async def _connect_stored(self) -> None:
        self.events.put_nowait(Connected(self.stored_jid() or "", None))


@pytest.mark.usefixtures("child_path")
def test_a_paired_child_hands_over_its_store_and_the_session_connects_in_process(tmp_path: Path) -> None:
    async def scenario() -> None:
        transport = ConnectsOffline(session(tmp_path), pairing_command=fake_pairing_command("pair"))
        assert transport.stored_jid() is None
        await transport.start()
        assert isinstance(await next_event(transport), QrCode)
        assert await transport.request_pair_code() == FAKE_PAIR_CODE  # asked of the child over its stdin
        assert await next_event(transport) == Paired(FAKE_JID)
        assert await next_event(transport) == Connected(FAKE_JID, None)  # after the store was moved into place
        worker = transport.pairing_worker
        assert worker is not None
        assert worker.returncode == 0
        assert process_state(worker.pid) is None
        assert sorted(p.name for p in (tmp_path / "sessions" / "s1").iterdir()) == [STORE_FILE]
        assert transport.stored_jid() == FAKE_JID
        await transport.stop()

    asyncio.run(scenario())


def test_the_pairing_worker_dies_with_its_parent(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.neonize_offline", "orphan", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["pdeathsig"] == signal.SIGKILL
    assert outcome["reaped"], outcome
    assert outcome["seconds"] < 5, outcome
    # The death signal, or (should the child see its stdin close first) its own exit.
    assert outcome["signal"] == signal.SIGKILL or outcome["exit"] == EXIT_PARENT_GONE, outcome
