"""One Baileys ``creds.json``: is it the credential set of a linked device of this phone?

Baileys (``useMultiFileAuthState``) writes its ``AuthenticationCreds`` as JSON with its
``BufferJSON`` replacer: every byte string is ``{"type": "Buffer", "data": "<base64>"}`` (older
versions and plain ``Buffer.toJSON`` wrote ``data`` as a list of byte values; both are read).
This module does no I/O: ``parse_creds`` takes the file's bytes, ``judge_creds`` the parsed
object.

What is judged, and why:

- ``me.id`` is the linked device's JID, ``user:device@s.whatsapp.net``. It must parse (waso's own
  ``parse_jid``), carry a device number of at least 1 (device 0 is the phone itself; an id without
  a device number was written by an old Baileys or a pairing that did not finish), and its user
  must be the phone the directory is named after. High device numbers (:32, :47, :53) are normal
  in real WhatsApp and are not judged. An agent part (``user.0:3@...``, older Baileys) is accepted
  when it is 0, the only agent of phone-number JIDs.
- The key material a linked device needs to connect as itself must be present and decodable:
  the Noise key pair, the signed identity key pair, the signed pre-key (key pair, signature, id),
  the registration id, the ADV secret and, once paired, the signed device identity (``account``).
- ``registered`` is not judged: Baileys sets it only when a device is linked with a pairing code;
  a device linked by QR code keeps ``registered: false`` for its whole life.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from waso.api.jid import parse_jid

MAX_CREDS_BYTES = 1 << 20
"""A real creds.json is a few kilobytes; anything above this is not read."""


class State(StrEnum):
    HEALTHY = "healthy"
    SUSPICIOUS = "suspicious"
    UNREADABLE = "unreadable"


class Code(StrEnum):
    """Why an entry is not healthy; the first group makes it unreadable, the rest suspicious."""

    SYMLINK = "Symlink"
    NOT_A_DIRECTORY = "NotADirectory"
    MISSING_CREDS = "MissingCreds"
    UNREADABLE_FILE = "UnreadableFile"
    INVALID_JSON = "InvalidJson"
    NOT_AN_OBJECT = "NotAnObject"

    NOT_PAIRED = "NotPaired"
    MALFORMED_JID = "MalformedJid"
    NO_DEVICE_NUMBER = "NoDeviceNumber"
    PRIMARY_DEVICE = "PrimaryDevice"
    IDENTITY_MISMATCH = "IdentityMismatch"
    MISSING_KEYS = "MissingKeys"
    INVALID_KEYS = "InvalidKeys"
    INVALID_PHONE = "InvalidPhone"
    DUPLICATE_PHONE = "DuplicatePhone"


UNREADABLE_CODES = frozenset(
    {
        Code.SYMLINK,
        Code.NOT_A_DIRECTORY,
        Code.MISSING_CREDS,
        Code.UNREADABLE_FILE,
        Code.INVALID_JSON,
        Code.NOT_AN_OBJECT,
    }
)


@dataclass(frozen=True)
class Finding:
    code: Code
    message: str


def state_of(findings: list[Finding] | tuple[Finding, ...]) -> State:
    if any(f.code in UNREADABLE_CODES for f in findings):
        return State.UNREADABLE
    return State.SUSPICIOUS if findings else State.HEALTHY


def quote(value: object, limit: int = 80) -> str:
    """A value read from a legacy file, safe to print and to put in a YAML comment (ASCII, no line breaks)."""
    if isinstance(value, dict | list):
        return f"a JSON {_json_type(value)}"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True, default=str)
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=True)


def parse_creds(raw: bytes) -> dict[str, Any] | Finding:
    """The parsed creds.json, or why it cannot be read as one."""
    if not raw.strip():
        return Finding(Code.INVALID_JSON, "creds.json is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Finding(Code.INVALID_JSON, f"creds.json is not UTF-8 text (byte {error.start}): corrupt")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        what = "truncated" if error.pos >= len(text.rstrip()) or _unclosed(text) else "corrupt"
        return Finding(Code.INVALID_JSON, f"creds.json is not valid JSON ({error.msg}; {where}): {what}")
    except RecursionError:
        return Finding(Code.INVALID_JSON, "creds.json is nested too deeply to be Baileys credentials")
    except ValueError as error:  # a number too long to convert, for one
        return Finding(Code.INVALID_JSON, f"creds.json cannot be read as JSON ({error}): corrupt")
    if not isinstance(data, dict):
        return Finding(Code.NOT_AN_OBJECT, f"creds.json holds a JSON {_json_type(data)}, not an object")
    return data


def _unclosed(text: str) -> bool:
    """Whether JSON text ends inside a string, object or array: what a write cut short leaves."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return in_string or depth > 0


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def decode_buffer(value: object) -> bytes | None:
    """The bytes of a BufferJSON value (``{"type": "Buffer", "data": ...}``), or None when it is not one."""
    if not isinstance(value, dict) or not (value.get("type") == "Buffer" or value.get("buffer") is True):
        return None
    data = value.get("data", value.get("value"))
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(data, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in data):
        return bytes(data)
    return None


_AGENT = re.compile(r"^(?P<user>[0-9]+)\.(?P<agent>[0-9]+)(?P<rest>(?::[0-9]+)?@.*)$", re.DOTALL)


def judge_identity(creds: dict[str, Any], phone: str) -> list[Finding]:
    """``me.id`` against the directory's phone (digits)."""
    me = creds.get("me")
    if me is None:
        return [
            Finding(Code.NOT_PAIRED, "creds.json has no me.id: the device was never paired, or pairing did not finish")
        ]
    if not isinstance(me, dict):
        return [Finding(Code.MALFORMED_JID, f"me is a JSON {_json_type(me)}, not an object with an id")]
    text = me.get("id")
    if not isinstance(text, str):
        return [Finding(Code.MALFORMED_JID, f"me.id is {quote(text)}, not a JID string")]
    agent = _AGENT.match(text)
    if agent is not None:
        if int(agent["agent"]) != 0:
            return [
                Finding(
                    Code.MALFORMED_JID,
                    f"me.id {quote(text)} has agent {int(agent['agent'])}; phone-number JIDs have agent 0",
                )
            ]
        text = agent["user"] + agent["rest"]
    jid = parse_jid(text)
    if jid is None:
        return [Finding(Code.MALFORMED_JID, f"me.id {quote(text)} is not user:device@s.whatsapp.net")]
    findings: list[Finding] = []
    if ":" not in text:
        findings.append(
            Finding(
                Code.NO_DEVICE_NUMBER,
                f"me.id {quote(text)} has no device number: written by an old Baileys or an unfinished "
                "pairing, the linked device cannot be identified",
            )
        )
    elif jid.device == 0:
        findings.append(
            Finding(Code.PRIMARY_DEVICE, f"me.id {quote(text)} names device 0, the phone itself, not a linked device")
        )
    if jid.user != phone:
        findings.append(
            Finding(
                Code.IDENTITY_MISMATCH,
                f"me.id {quote(text)} belongs to {jid.user}, not to the directory's phone {phone}",
            )
        )
    return findings


def decode_bytes(value: object) -> bytes | None:
    """BufferJSON bytes, or base64 text (how Baileys writes the protobuf fields of ``account``)."""
    decoded = decode_buffer(value)
    if decoded is None and isinstance(value, str):
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return decoded


def _bytes(value: object, path: str, lengths: tuple[int, ...], invalid: list[str], text: bool = False) -> None:
    decoded = decode_bytes(value) if text else decode_buffer(value)
    if decoded is None:
        kind = "BufferJSON or base64 bytes" if text else "a BufferJSON byte string"
        invalid.append(f"{path} is not {kind}")
    elif lengths and len(decoded) not in lengths:
        invalid.append(f"{path} has {len(decoded)} bytes, not {' or '.join(map(str, lengths))}")


def _key_pair(value: object, path: str, invalid: list[str]) -> None:
    if not isinstance(value, dict):
        invalid.append(f"{path} is not a key pair")
        return
    _bytes(value.get("private"), f"{path}.private", (32,), invalid)
    _bytes(value.get("public"), f"{path}.public", (32, 33), invalid)


def _integer(value: object, path: str, low: int, high: int, invalid: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        invalid.append(f"{path} is {quote(value)}, not an integer from {low} to {high}")


def judge_keys(creds: dict[str, Any]) -> list[Finding]:
    """The key material a linked device needs to connect as itself: present, decodable, of the right sizes."""
    required = ["noiseKey", "signedIdentityKey", "signedPreKey", "registrationId", "advSecretKey"]
    if creds.get("me") is not None:
        required.append("account")  # the signed device identity, written when the device is paired
    missing = [name for name in required if creds.get(name) is None]
    invalid: list[str] = []
    for name in ("noiseKey", "signedIdentityKey"):
        if name not in missing:
            _key_pair(creds[name], name, invalid)
    if "signedPreKey" not in missing:
        pre_key = creds["signedPreKey"]
        if isinstance(pre_key, dict):
            _key_pair(pre_key.get("keyPair"), "signedPreKey.keyPair", invalid)
            _bytes(pre_key.get("signature"), "signedPreKey.signature", (64,), invalid)
            _integer(pre_key.get("keyId"), "signedPreKey.keyId", 0, (1 << 24) - 1, invalid)
        else:
            invalid.append("signedPreKey is not an object")
    if "registrationId" not in missing:
        _integer(creds["registrationId"], "registrationId", 0, 16383, invalid)
    if "advSecretKey" not in missing:
        secret = creds["advSecretKey"]
        try:
            size = len(base64.b64decode(secret, validate=True)) if isinstance(secret, str) else -1
        except (binascii.Error, ValueError):
            size = -1
        if size != 32:
            invalid.append("advSecretKey is not 32 bytes in base64")
    if "account" in required and "account" not in missing:
        account = creds["account"]
        if isinstance(account, dict):
            _bytes(account.get("details"), "account.details", (), invalid, text=True)
            _bytes(account.get("accountSignature"), "account.accountSignature", (64,), invalid, text=True)
            _bytes(account.get("deviceSignature"), "account.deviceSignature", (64,), invalid, text=True)
        else:
            invalid.append("account is not an object")
    findings: list[Finding] = []
    if missing:
        findings.append(
            Finding(Code.MISSING_KEYS, f"creds.json lacks {', '.join(missing)}: the device cannot connect as itself")
        )
    if invalid:
        findings.append(Finding(Code.INVALID_KEYS, "; ".join(invalid)))
    return findings


def judge_creds(creds: dict[str, Any], phone: str) -> list[Finding]:
    """Every finding about a parsed creds.json of the directory named after ``phone``; none: healthy."""
    return judge_identity(creds, phone) + judge_keys(creds)
