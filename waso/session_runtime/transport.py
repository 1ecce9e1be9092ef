"""One interface for the ways a session reaches WhatsApp.

A transport covers one connection attempt of one session: ``start()`` begins it and
returns at once; what happens arrives as events on ``events``; ``stop()`` closes it.
Reconnecting, back-off, leases and status belong to the supervisor, so every
transport behaves the same towards them. Each transport keeps its own credential
store in the session's directory and can say whom it holds without connecting.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path


@dataclass(frozen=True)
class QrCode:
    code: str
    expires_at: datetime


@dataclass(frozen=True)
class Paired:
    jid: str


@dataclass(frozen=True)
class Connected:
    jid: str
    push_name: str | None


@dataclass(frozen=True)
class Disconnected:
    error: str


@dataclass(frozen=True)
class LoggedOut:
    reason: str


@dataclass(frozen=True)
class StreamReplaced:
    pass


@dataclass(frozen=True)
class TemporaryBan:
    until: datetime | None
    reason: str


@dataclass(frozen=True)
class IncomingMessage:
    sender: str
    text: str
    id: str
    """WhatsApp's message id (stable: a redelivered message has the same one)."""
    chat: str
    """The chat's JID: the sender's for a direct message, the group's in a group."""
    at: datetime


@dataclass(frozen=True)
class OutgoingMessage:
    """WhatsApp took a message this session sent (queued before its receipts can be)."""

    id: str
    to: str
    text: str
    at: datetime


class AckStatus(StrEnum):
    SERVER = "server"
    """WhatsApp's server took the message."""
    DELIVERED = "delivered"
    READ = "read"


@dataclass(frozen=True)
class MessageAck:
    """A receipt for a message this session sent."""

    ids: tuple[str, ...]
    chat: str
    status: AckStatus
    at: datetime


TransportEvent = (
    QrCode
    | Paired
    | Connected
    | Disconnected
    | LoggedOut
    | StreamReplaced
    | TemporaryBan
    | IncomingMessage
    | OutgoingMessage
    | MessageAck
)
"""Disconnected, LoggedOut, StreamReplaced and TemporaryBan end a connection attempt."""

ENDING = (Disconnected, LoggedOut, StreamReplaced, TemporaryBan)


class TransportError(RuntimeError):
    """A request to the transport failed (not connected, timed out, refused)."""


@dataclass(frozen=True)
class SessionIdentity:
    namespace: str
    name: str
    phone_number: str
    device_name: str
    store_dir: Path
    """This session's own directory: its credential store lives here and nowhere else."""


class Transport(abc.ABC):
    def __init__(self, session: SessionIdentity) -> None:
        self.session = session
        self.events: asyncio.Queue[TransportEvent] = asyncio.Queue()

    @abc.abstractmethod
    def stored_jid(self) -> str | None:
        """The JID in the credential store, read without connecting; None when never paired."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin one connection attempt; outcomes arrive as events."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close the connection; idempotent."""

    @abc.abstractmethod
    async def send_text(self, to: str, text: str) -> str:
        """Send a text message; returns the message id, and queues an OutgoingMessage before any receipt of it."""

    @abc.abstractmethod
    async def request_pair_code(self) -> str:
        """Ask for an 8-character code to type on the phone (Link with phone number)."""

    @abc.abstractmethod
    async def unlink(self) -> None:
        """Log the stored device out at WhatsApp (it leaves the phone's Linked devices); raises TransportError."""
