"""`waso legacy import`: a Baileys ``creds.json`` turned into the neonize (whatsmeow) store of a session.

Baileys and whatsmeow keep the same key material of a linked device; only the containers differ.
``device_row`` maps a parsed ``creds.json`` (read with ``waso.legacy.creds``) to the one row of
``whatsmeow_device`` that whatsmeow needs to connect as that device, and refuses credentials
that are incomplete or inconsistent, naming every problem. ``write_store`` writes a complete
``whatsmeow.db`` (schema created by neonize itself) under a temporary name, reads it back through
neonize, and only then links it into place; an existing store is never replaced.

Column by column (whatsmeow ``store/sqlstore/container.go``: it keeps private keys and derives the
public ones with ``keys.NewKeyPairFromPrivateKey``):

- ``jid``: ``me.id`` as ``user:device@s.whatsapp.net`` (Baileys' ``user.0:3@...`` loses its agent 0);
- ``lid``: ``me.lid`` (``user:device@lid``) when Baileys has it, else NULL as before LID migration;
- ``registration_id``: ``registrationId``;
- ``noise_key``, ``identity_key``: ``noiseKey.private``, ``signedIdentityKey.private``;
- ``signed_pre_key``, ``signed_pre_key_id``, ``signed_pre_key_sig``: ``signedPreKey.keyPair.private``,
  ``.keyId``, ``.signature``;
- ``adv_key``: ``advSecretKey`` (base64 text in Baileys);
- ``adv_details``, ``adv_account_sig``, ``adv_account_sig_key``, ``adv_device_sig``: ``account.details``,
  ``.accountSignature``, ``.accountSignatureKey``, ``.deviceSignature`` (the signed device identity;
  Baileys writes these as base64 text through protobuf's toJSON, or as BufferJSON: both are read);
- ``platform``: ``platform``; ``push_name``: ``me.name``; ``business_name`` stays empty.

Every public key Baileys stored must be the X25519 public key of its private key (RFC 7748,
computed with ``cryptography``), so keys copied from two different devices are refused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from waso.api.jid import parse_jid
from waso.legacy.creds import MAX_CREDS_BYTES, decode_buffer, decode_bytes, judge_identity, parse_creds, quote

STORE_FILE = "whatsmeow.db"
"""The store's file name in a session's store directory: waso.session_runtime.neonize_transport.STORE_FILE."""

PROG = "waso legacy import"

_PHONE = re.compile(r"^\+?([1-9][0-9]{6,14})$")
_AGENT_ZERO = re.compile(r"^([0-9]+)\.0(:[0-9]+)?@")
_LID = re.compile(r"^[0-9]{1,20}(?::[0-9]{1,4})?@lid$")


class ImportRefused(Exception):
    """The credentials cannot be imported (or the target cannot be written); ``problems`` names each reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DeviceRow:
    """One ``whatsmeow_device`` row."""

    jid: str
    lid: str | None
    registration_id: int
    noise_key: bytes
    identity_key: bytes
    signed_pre_key: bytes
    signed_pre_key_id: int
    signed_pre_key_sig: bytes
    adv_key: bytes
    adv_details: bytes
    adv_account_sig: bytes
    adv_account_sig_key: bytes
    adv_device_sig: bytes
    platform: str
    push_name: str

    @property
    def device(self) -> int:
        jid = parse_jid(self.jid)
        assert jid is not None  # built from a parsed JID
        return jid.device


COLUMNS = (
    "jid",
    "lid",
    "registration_id",
    "noise_key",
    "identity_key",
    "signed_pre_key",
    "signed_pre_key_id",
    "signed_pre_key_sig",
    "adv_key",
    "adv_details",
    "adv_account_sig",
    "adv_account_sig_key",
    "adv_device_sig",
    "platform",
    "push_name",
)


def public_key(private: bytes) -> bytes:
    """The X25519 public key (RFC 7748) of a 32-byte Curve25519 private key."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class _Reader:
    """Collects the missing and the unusable fields while reading them."""

    def __init__(self, creds: dict[str, Any]) -> None:
        self.creds = creds
        self.missing: list[str] = []
        self.invalid: list[str] = []

    def get(self, path: str) -> object:
        value: object = self.creds
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            self.missing.append(path)
        return value

    def buffer(self, path: str, size: int, *, text: bool = False) -> bytes:
        """BufferJSON bytes of ``size`` (with ``text``: base64 text too); b"" when missing or invalid."""
        value = self.get(path)
        if value is None:
            return b""
        decoded = decode_bytes(value) if text else decode_buffer(value)
        if decoded is None:
            kind = "BufferJSON or base64 bytes" if text else "a BufferJSON byte string"
            self.invalid.append(f"{path} is not {kind}")
            return b""
        if size and len(decoded) != size:
            self.invalid.append(f"{path} has {len(decoded)} bytes, not {size}")
            return b""
        return decoded

    def integer(self, path: str, high: int) -> int:
        value = self.get(path)
        if value is None:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
            self.invalid.append(f"{path} is {quote(value)}, not an integer from 0 to {high}")
            return 0
        return value

    def key_pair(self, path: str) -> bytes:
        """The private key, after checking that the stored public key belongs to it."""
        private = self.buffer(f"{path}.private", 32)
        public = self.get(f"{path}.public")
        if public is None:
            return private
        stored = decode_buffer(public)
        if stored is not None and len(stored) == 33 and stored[0] == 5:
            stored = stored[1:]  # libsignal's key-type prefix
        if stored is None or len(stored) != 32:
            self.invalid.append(f"{path}.public is not a 32-byte key (or 33 with the 0x05 prefix)")
        elif private and public_key(private) != stored:
            self.invalid.append(f"{path}.public is not the public key of {path}.private: a mixed-up key pair")
        return private


def device_row(creds: dict[str, Any], phone: str) -> DeviceRow:
    """The device row of a parsed creds.json of ``phone`` (digits); ImportRefused names every problem."""
    identity = judge_identity(creds, phone)
    if identity:
        raise ImportRefused([finding.message for finding in identity])
    me = creds["me"]
    jid_text = _AGENT_ZERO.sub(r"\1\2@", me["id"])
    jid = parse_jid(jid_text)
    assert jid is not None  # judge_identity parsed it
    read = _Reader(creds)
    noise_key = read.key_pair("noiseKey")
    identity_key = read.key_pair("signedIdentityKey")
    signed_pre_key = read.key_pair("signedPreKey.keyPair")
    signed_pre_key_sig = read.buffer("signedPreKey.signature", 64)
    signed_pre_key_id = read.integer("signedPreKey.keyId", (1 << 24) - 1)
    registration_id = read.integer("registrationId", 16383)
    adv_key = b""
    secret = read.get("advSecretKey")
    if secret is not None:
        try:
            adv_key = base64.b64decode(secret, validate=True) if isinstance(secret, str) else b""
        except (binascii.Error, ValueError):
            adv_key = b""
        if len(adv_key) != 32:
            read.invalid.append("advSecretKey is not 32 bytes in base64")
    adv_details = read.buffer("account.details", 0, text=True)
    if (
        "account.details" not in read.missing
        and not adv_details
        and not any(p.startswith("account.details") for p in read.invalid)
    ):
        read.invalid.append("account.details is empty")
    adv_account_sig = read.buffer("account.accountSignature", 64, text=True)
    adv_account_sig_key = read.buffer("account.accountSignatureKey", 32, text=True)
    adv_device_sig = read.buffer("account.deviceSignature", 64, text=True)
    lid = me.get("lid")
    if lid is not None and lid != "":
        if isinstance(lid, str):
            lid = _AGENT_ZERO.sub(r"\1\2@", lid)
        if not isinstance(lid, str) or not _LID.match(lid):
            read.invalid.append(f"me.lid is {quote(lid)}, not user:device@lid")
    else:
        lid = None
    platform = creds.get("platform")
    push_name = me.get("name")
    problems: list[str] = []
    if read.missing:
        problems.append(f"creds.json lacks {', '.join(read.missing)}")
    problems.extend(read.invalid)
    if problems:
        raise ImportRefused(problems)
    return DeviceRow(
        jid=str(jid),
        lid=lid,
        registration_id=registration_id,
        noise_key=noise_key,
        identity_key=identity_key,
        signed_pre_key=signed_pre_key,
        signed_pre_key_id=signed_pre_key_id,
        signed_pre_key_sig=signed_pre_key_sig,
        adv_key=adv_key,
        adv_details=adv_details,
        adv_account_sig=adv_account_sig,
        adv_account_sig_key=adv_account_sig_key,
        adv_device_sig=adv_device_sig,
        platform=platform if isinstance(platform, str) else "",
        push_name=push_name if isinstance(push_name, str) else "",
    )


def read_creds(directory: Path) -> dict[str, Any]:
    """The parsed ``creds.json`` of a Baileys auth directory; ImportRefused when it cannot be read."""
    path = directory / "creds.json"
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CREDS_BYTES + 1)
    except OSError as error:
        raise ImportRefused([f"cannot read {path}: {error.strerror or type(error).__name__}"]) from error
    if len(raw) > MAX_CREDS_BYTES:
        raise ImportRefused([f"{path} is larger than {MAX_CREDS_BYTES} bytes: not Baileys credentials"])
    parsed = parse_creds(raw)
    if not isinstance(parsed, dict):
        raise ImportRefused([parsed.message])
    return parsed


def read_row(store: Path) -> DeviceRow | None:
    """The device row of a whatsmeow store, read-only; None when it holds no device."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM whatsmeow_device").fetchall()
    if len(row) != 1:
        return None
    return DeviceRow(*row[0])


def _neonize_devices(store: Path) -> list[str]:
    """The JIDs of the devices in ``store`` as neonize reads them (whatsmeow creates the schema when absent)."""
    from neonize.aioze.client import ClientFactory

    devices = ClientFactory.get_all_devices_from_db(str(store))
    # neonize's listing puts "user:device" into JID.User and leaves JID.Device 0.
    return [f"{d.JID.User}{f':{d.JID.Device}' if d.JID.Device else ''}@{d.JID.Server}" for d in devices]


def _remove(path: Path) -> None:
    for name in (path, *(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            name.unlink()


def write_store(row: DeviceRow, store_dir: Path) -> Path:
    """Write ``store_dir/whatsmeow.db`` holding ``row``; never replaces a store, never leaves a partial one."""
    target = store_dir / STORE_FILE
    if target.exists() or target.is_symlink():
        raise ImportRefused([f"{target} exists: a session store is never replaced (move it away first)"])
    store_dir.mkdir(parents=True, exist_ok=True)
    partial = store_dir / f".{STORE_FILE}.import-{os.getpid()}"
    _remove(partial)
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # keys: owner only
        if _neonize_devices(partial):  # whatsmeow creates its schema in the empty file
            raise ImportRefused([f"{partial}: a new store already holds a device"])
        with contextlib.closing(sqlite3.connect(partial)) as db, db:
            # The push name is set after neonize's check: its device listing splits on "," (neonize 0.5.2).
            db.execute(
                f"INSERT INTO whatsmeow_device ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [getattr(row, column) if column != "push_name" else "" for column in COLUMNS],
            )
        if _neonize_devices(partial) != [row.jid]:  # whatsmeow's scanDevice: lengths and key pairs load
            raise ImportRefused([f"{partial}: neonize does not read the device {row.jid} back"])
        with contextlib.closing(sqlite3.connect(partial)) as db, db:
            db.execute("UPDATE whatsmeow_device SET push_name = ?", (row.push_name,))
        if read_row(partial) != row:
            raise ImportRefused([f"{partial}: the row read back differs from the row written"])
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        try:
            os.link(partial, target)  # fails if a store appeared meanwhile: never replaced
        except FileExistsError as error:
            raise ImportRefused([f"{target} exists: a session store is never replaced"]) from error
        directory = os.open(store_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        _remove(partial)
    return target


def phone_of(directory: Path, phone: str | None) -> str:
    """The phone's digits: from ``--phone`` or else the directory's name."""
    text = phone if phone is not None else directory.name
    match = _PHONE.match(re.sub(r"[\s().-]", "", text))
    if match is None:
        source = "--phone" if phone is not None else f"the directory name {quote(directory.name)}"
        raise ImportRefused([f"{source} is not an E.164 phone number: name it with --phone +<digits>"])
    return match[1]


def import_command(directory: str, store_dir: str, phone: str | None = None) -> int:
    """Exit 0 when the store was written, 2 when refused (reasons on standard error), 1 when writing failed."""
    try:
        digits = phone_of(Path(directory), phone)
        row = device_row(read_creds(Path(directory)), digits)
    except ImportRefused as error:
        for problem in error.problems:
            print(f"{PROG}: refused: {problem}", file=sys.stderr)
        return 2
    try:
        target = write_store(row, Path(store_dir))
    except ImportRefused as error:
        for problem in error.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as error:
        print(f"{PROG}: writing the store failed, nothing was written: {error}", file=sys.stderr)
        return 1
    print(f"{PROG}: {row.jid} (device {row.device}) written to {target}")
    return 0
