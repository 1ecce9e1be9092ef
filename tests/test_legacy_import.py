"""`waso legacy import`: Baileys creds.json into a whatsmeow store that neonize reads back as the same device.

The fixtures hold real Curve25519 key pairs (random private keys, public keys by RFC 7748 X25519
from ``cryptography``, checked against the RFC's vectors below), encoded as Baileys writes them.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from neonize.aioze.client import ClientFactory

from tests.support import run_waso
from waso.api.jid import parse_jid
from waso.legacy.importer import STORE_FILE, ImportRefused, device_row, public_key, read_row, write_store
from waso.session_runtime import neonize_transport
from waso.session_runtime.neonize_transport import jid_text, stored_jid

REPO = Path(__file__).resolve().parent.parent
PHONE = "51949376824"


def buffer(data: bytes, *, as_list: bool = False) -> dict[str, Any]:
    """BufferJSON as Baileys writes it (older versions: a list of byte values)."""
    return {"type": "Buffer", "data": list(data) if as_list else base64.b64encode(data).decode()}


def key_pair(*, prefixed: bool = False) -> tuple[bytes, dict[str, Any]]:
    private = os.urandom(32)
    public = (b"\x05" if prefixed else b"") + public_key(private)
    return private, {"private": buffer(private), "public": buffer(public)}


def baileys_creds(me_id: str = f"{PHONE}.0:47@s.whatsapp.net", *, account_as_buffers: bool = False) -> dict[str, Any]:
    """A complete creds.json; ``account`` as protobuf toJSON writes it (base64 text) unless asked otherwise."""
    noise, noise_pair = key_pair()
    identity, identity_pair = key_pair(prefixed=True)
    pre_key, pre_key_pair = key_pair()
    account = {
        "details": os.urandom(19),
        "accountSignatureKey": os.urandom(32),
        "accountSignature": os.urandom(64),
        "deviceSignature": os.urandom(64),
    }
    encode = buffer if account_as_buffers else (lambda raw: base64.b64encode(raw).decode())
    return {
        "noiseKey": noise_pair,
        "pairingEphemeralKeyPair": key_pair()[1],
        "signedIdentityKey": identity_pair,
        "signedPreKey": {"keyPair": pre_key_pair, "signature": buffer(os.urandom(64), as_list=True), "keyId": 1},
        "registrationId": 4711,
        "advSecretKey": base64.b64encode(os.urandom(32)).decode(),
        "nextPreKeyId": 31,
        "firstUnuploadedPreKeyId": 31,
        "account": {name: encode(raw) for name, raw in account.items()},
        "me": {"id": me_id, "name": "Acme Ventas", "lid": "123456789012345:47@lid"},
        "platform": "smba",
        "registered": False,
        "_private": {"noise": noise, "identity": identity, "pre_key": pre_key, "account": account},
    }


def raw(value: Any) -> bytes:
    data = value["data"] if isinstance(value, dict) else value
    return bytes(data) if isinstance(data, list) else base64.b64decode(data)


def write_creds(root: Path, creds: dict[str, Any], name: str = PHONE) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "creds.json").write_text(json.dumps({k: v for k, v in creds.items() if k != "_private"}))
    return directory


def waso(*args: str) -> subprocess.CompletedProcess[str]:
    return run_waso("legacy", "import", *args)


def x25519(scalar: bytes, u: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(u))


def test_x25519_matches_rfc7748() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert public_key(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert public_key(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert x25519(alice, public_key(bob)).hex() == x25519(bob, public_key(alice)).hex() == shared
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519(k, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"


@pytest.mark.parametrize("account_as_buffers", [False, True], ids=["account-base64", "account-bufferjson"])
def test_imported_store_is_read_back_by_neonize_as_the_same_device(tmp_path: Path, account_as_buffers: bool) -> None:
    creds = baileys_creds(account_as_buffers=account_as_buffers)
    directory = write_creds(tmp_path / "auth", creds)
    store_dir = tmp_path / "sessions" / "s-51949376824"

    result = waso(str(directory), "--store-dir", str(store_dir))
    assert result.returncode == 0, result.stderr
    store = store_dir / STORE_FILE
    assert f"{PHONE}:47@s.whatsapp.net (device 47)" in result.stdout
    assert sorted(p.name for p in store_dir.iterdir()) == [STORE_FILE]  # no temporary file left
    assert stat.S_IMODE(store.stat().st_mode) == 0o600

    # The runtime's own reading: a stored identity, so it connects instead of pairing.
    assert neonize_transport.STORE_FILE == STORE_FILE
    assert stored_jid(store) == f"{PHONE}:47@s.whatsapp.net"
    # whatsmeow's own loading (scanDevice: key lengths, key pairs from the private keys).
    devices = ClientFactory.get_all_devices_from_db(str(store))
    assert [(jid_text(d.JID), d.PushName, d.Initialized) for d in devices] == [
        (f"{PHONE}:47@s.whatsapp.net", "Acme Ventas", True)
    ]
    parsed = parse_jid(jid_text(devices[0].JID))  # neonize's listing keeps ":47" in JID.User
    assert parsed is not None
    assert (parsed.user, parsed.device) == (PHONE, 47)
    # The key material, byte for byte.
    row = read_row(store)
    assert row is not None
    secret = creds["_private"]
    assert (row.noise_key, row.identity_key, row.signed_pre_key) == (
        secret["noise"],
        secret["identity"],
        secret["pre_key"],
    )
    assert row.signed_pre_key_sig == raw(creds["signedPreKey"]["signature"])
    assert (row.signed_pre_key_id, row.registration_id) == (1, 4711)
    assert row.adv_key == base64.b64decode(creds["advSecretKey"])
    account = secret["account"]
    assert (row.adv_details, row.adv_account_sig_key, row.adv_account_sig, row.adv_device_sig) == (
        account["details"],
        account["accountSignatureKey"],
        account["accountSignature"],
        account["deviceSignature"],
    )
    assert (row.lid, row.platform, row.push_name) == ("123456789012345:47@lid", "smba", "Acme Ventas")


def test_incomplete_credentials_are_refused_naming_every_missing_field(tmp_path: Path) -> None:
    creds = baileys_creds()
    del creds["noiseKey"]
    del creds["account"]["deviceSignature"]
    del creds["signedPreKey"]["keyId"]
    del creds["advSecretKey"]
    directory = write_creds(tmp_path / "auth", creds)
    store_dir = tmp_path / "store"

    result = waso(str(directory), "--store-dir", str(store_dir))
    assert result.returncode == 2
    assert result.stdout == ""
    lacks = next(line for line in result.stderr.splitlines() if "lacks" in line)
    for field in (
        "noiseKey.private",
        "noiseKey.public",
        "signedPreKey.keyId",
        "advSecretKey",
        "account.deviceSignature",
    ):
        assert field in lacks
    assert "signedIdentityKey" not in result.stderr
    assert not store_dir.exists()  # nothing written


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.pop("me"), "never paired"),
        (lambda c: c["me"].update(id=f"{PHONE}@s.whatsapp.net"), "no device number"),
        (lambda c: c["me"].update(id=f"{PHONE}:0@s.whatsapp.net"), "the phone itself"),
        (lambda c: c["me"].update(id="4915112345601:3@s.whatsapp.net"), "not to the directory's phone"),
        (
            lambda c: c["signedIdentityKey"].update(public=c["noiseKey"]["public"]),
            "signedIdentityKey.public is not the public key of signedIdentityKey.private",
        ),
        (lambda c: c["account"].update(accountSignature="c2hvcnQ="), "account.accountSignature has 5 bytes, not 64"),
        (lambda c: c["account"].update(details=""), "account.details is empty"),
        (lambda c: c.update(registrationId=-1), 'registrationId is "-1", not an integer'),
        (lambda c: c["me"].update(lid="abc@lid"), "me.lid"),
    ],
)
def test_inconsistent_credentials_are_refused(tmp_path: Path, change: Any, expected: str) -> None:
    creds = baileys_creds()
    change(creds)
    with pytest.raises(ImportRefused) as refused:
        device_row(json.loads(json.dumps({k: v for k, v in creds.items() if k != "_private"})), PHONE)
    assert expected in str(refused.value)


def test_an_existing_store_is_never_replaced(tmp_path: Path) -> None:
    row = device_row(baileys_creds(), PHONE)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / STORE_FILE).write_bytes(b"live store")
    with pytest.raises(ImportRefused, match="never replaced"):
        write_store(row, store_dir)
    assert (store_dir / STORE_FILE).read_bytes() == b"live store"
    assert sorted(p.name for p in store_dir.iterdir()) == [STORE_FILE]


def test_phone_from_option_and_device_number_kept(tmp_path: Path) -> None:
    directory = write_creds(tmp_path / "auth", baileys_creds(f"{PHONE}:3@s.whatsapp.net"), name="acme-main")
    store_dir = tmp_path / "store"
    unnamed = waso(str(directory), "--store-dir", str(store_dir))
    assert unnamed.returncode == 2
    assert "--phone" in unnamed.stderr
    named = waso(str(directory), "--store-dir", str(store_dir), "--phone", f"+{PHONE}")
    assert named.returncode == 0, named.stderr
    assert stored_jid(store_dir / STORE_FILE) == f"{PHONE}:3@s.whatsapp.net"


def test_the_row_fits_whatsmeows_schema_checks(tmp_path: Path) -> None:
    """The CHECK constraints of whatsmeow_device (lengths, ranges) accept the row; a second import is refused."""
    store_dir = tmp_path / "store"
    target = write_store(device_row(baileys_creds(), PHONE), store_dir)
    with sqlite3.connect(target) as db:
        schema = db.execute("SELECT sql FROM sqlite_master WHERE name = 'whatsmeow_device'").fetchone()[0]
    assert "length(adv_account_sig_key) = 32" in schema
    with pytest.raises(ImportRefused):
        write_store(device_row(baileys_creds(), PHONE), store_dir)


def test_a_push_name_with_a_comma_is_imported(tmp_path: Path) -> None:
    """neonize 0.5.2 splits its device listing on ",": the import checks through neonize before naming."""
    creds = baileys_creds()
    creds["me"]["name"] = "Acme, Ventas"
    target = write_store(
        device_row(json.loads(json.dumps({k: v for k, v in creds.items() if k != "_private"})), PHONE), tmp_path
    )
    row = read_row(target)
    assert row is not None
    assert row.push_name == "Acme, Ventas"
    assert stored_jid(target) == f"{PHONE}:47@s.whatsapp.net"
