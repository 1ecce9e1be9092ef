"""The neonize transport with the real library: stores, real event objects, no-network behaviour."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
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
    StreamReplacedEv,
    TemporaryBanEv,
)
from neonize.proto.Neonize_pb2 import JID, ConnectFailureReason, MessageInfo, MessageSource
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message
from neonize.utils.jid import build_jid

from waso.session_runtime.neonize_transport import STORE_FILE, jid_text, map_event, stored_jid
from waso.session_runtime.transport import (
    Disconnected,
    IncomingMessage,
    LoggedOut,
    Paired,
    StreamReplaced,
    TemporaryBan,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
EMPTY = JID(User="", Server="", Device=0, RawAgent=0, Integrator=0, IsEmpty=True)
ME = JID(User="4915112345601", Device=53, Server="s.whatsapp.net", RawAgent=0, Integrator=0, IsEmpty=False)


def roundtrip(event: object) -> object:
    """Serialize and parse, as the events arrive from whatsmeow through the FFI."""
    return type(event).FromString(event.SerializeToString())  # type: ignore[attr-defined]


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
        (message, IncomingMessage("15552223333@s.whatsapp.net", "hello")),
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


def test_connecting_without_network_ends_disconnected_with_back_off(tmp_path: Path) -> None:
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
        # Back-off: 8 s allow at most about 1 + 0.5 + 1 + 2 + 4 s of waiting, never a busy loop.
        assert 2 <= outcome["attempts"][name] <= 6, outcome["attempts"]
        assert (tmp_path / "sessions" / name / STORE_FILE).exists()  # its own store, absolute path
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
